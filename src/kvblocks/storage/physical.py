"""PhysicalLayout: a layout together with the storage its addresses point into.

Built in the seed's order, each step a method of the builder::

    PhysicalLayout.builder(config)          # sizes
        .fully_contiguous()                 # or .layer_separate(block_dim), .outer_separate()
        .kv_format(KvBlockLayout.OperationalNHD)   # optional; Unknown by default
        .allocate_device(0)                 # or allocate_pinned / allocate_system /
                                            #    allocate_disk(path) / with_external_regions
        .build()

For memory, the layout's regions are addresses. For disk, the allocations of the layout are
consecutive segments of one file (each aligned to :data:`~kvblocks.storage.disk.DIRECT_ALIGN`),
and the layout's "addresses" are offsets into that file.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from kvblocks.errors import (
    BlockIdOutOfRangeError,
    InvalidArgumentError,
    LayoutFormatError,
    LayoutReleasedError,
)
from kvblocks.layout import (
    BlockDimension,
    FullyContiguousLayout,
    KvBlockLayout,
    LayerSeparateLayout,
    Layout,
    LayoutConfig,
    LayoutKind,
    MemoryRegion,
    OuterSeparateLayout,
    check_stored_format,
)
from kvblocks.storage.disk import DIRECT_ALIGN, DiskAllocation
from kvblocks.storage.kinds import StorageKind
from kvblocks.storage.memory import (
    Allocation,
    MemoryAllocation,
    RemoteAllocation,
    allocate_device,
    allocate_pinned,
    allocate_system,
    wrap_tensor,
)
from kvblocks.storage.numa import check_node


class PhysicalLayout:
    """A :class:`Layout` and the storage behind it. Build one with :meth:`builder`.

    Attributes:
        layout: the address arithmetic.
        storage: the kind of storage.
        allocations: memory allocations (one per region of ``layout.memory``), or the one file.
    """

    def __init__(self, layout: Layout, storage: StorageKind, allocations: Sequence[Allocation]):
        self.layout = layout
        self.storage = storage
        self.allocations = tuple(allocations)
        #: System memory standing in for device or pinned memory (no GPU here).
        self.emulated = any(getattr(a, "emulated", False) for a in self.allocations)
        start = min(r.addr for r in layout.memory)
        #: From the lowest address (or file offset) of the layout to one past its highest.
        self.span = MemoryRegion(start, max(r.end for r in layout.memory) - start)

    @staticmethod
    def builder(config: LayoutConfig) -> PhysicalLayoutBuilder:
        """Start building a layout of ``config``."""
        return PhysicalLayoutBuilder(config)

    @property
    def config(self) -> LayoutConfig:
        return self.layout.config

    @property
    def kv_format(self) -> KvBlockLayout:
        return self.layout.kv_format

    @property
    def released(self) -> bool:
        return any(a.released for a in self.allocations)

    @property
    def device(self) -> torch.device | None:
        """Where memory layouts' bytes are (``cuda:N`` or ``cpu``); ``None`` for disk and remote."""
        first = self.allocations[0]
        return first.device if isinstance(first, MemoryAllocation) else None

    @property
    def file(self) -> DiskAllocation:
        """The file of a disk layout."""
        if self.storage is not StorageKind.DISK:
            raise InvalidArgumentError("layout", f"is {self.storage.value} storage, not a file")
        return self.allocations[0]

    def check_alive(self) -> None:
        """Raise :class:`LayoutReleasedError` if the storage was released."""
        if self.released:
            raise LayoutReleasedError("this layout's storage was released; build a new one")

    def release(self) -> None:
        """Free the storage this layout allocated (external tensors are only let go)."""
        for allocation in self.allocations:
            allocation.release()

    def __repr__(self) -> str:
        return f"PhysicalLayout({self.storage.value}, {self.layout!r})"


class PhysicalLayoutBuilder:
    """Collects the choices of a :class:`PhysicalLayout`; nothing is allocated before build()."""

    def __init__(self, config: LayoutConfig) -> None:
        if not isinstance(config, LayoutConfig):
            raise InvalidArgumentError("config", f"must be a LayoutConfig, got {config!r}")
        self._config = config
        self._block_dim: BlockDimension | None = None
        self._kind: LayoutKind | None = None
        self._format = KvBlockLayout.Unknown
        self._memory: tuple | None = None

    def of_kind(
        self, kind: LayoutKind, block_dim: BlockDimension | None = BlockDimension.BLOCK_FIRST
    ) -> PhysicalLayoutBuilder:
        """A layout of ``kind``; ``block_dim`` is where the block index sits in a layer-separate
        layout's allocations (ignored for the other kinds)."""
        if not isinstance(kind, LayoutKind):
            raise InvalidArgumentError("kind", f"must be a LayoutKind, got {kind!r}")
        self._kind = kind
        self._block_dim = block_dim if kind is LayoutKind.LAYER_SEPARATE else None
        return self

    def fully_contiguous(self) -> PhysicalLayoutBuilder:
        """One allocation ``[num_blocks, nl, no, inner]``."""
        return self.of_kind(LayoutKind.FULLY_CONTIGUOUS)

    def layer_separate(
        self, block_dim: BlockDimension = BlockDimension.BLOCK_FIRST
    ) -> PhysicalLayoutBuilder:
        """One allocation per layer, block-first or outer-first."""
        return self.of_kind(LayoutKind.LAYER_SEPARATE, block_dim)

    def outer_separate(self) -> PhysicalLayoutBuilder:
        """One allocation per layer and outer chunk, each ``[num_blocks, inner]``."""
        return self.of_kind(LayoutKind.OUTER_SEPARATE)

    def kv_format(self, fmt: KvBlockLayout) -> PhysicalLayoutBuilder:
        """The order of dims inside each block (default ``Unknown``)."""
        if not isinstance(fmt, KvBlockLayout):
            raise LayoutFormatError("fmt", f"must be a KvBlockLayout, got {fmt!r}")
        self._format = fmt
        return self

    def allocate_device(self, device_id: int = 0) -> PhysicalLayoutBuilder:
        return self._set_memory("device", device_id)

    def allocate_pinned(self, numa_node: int | None = None) -> PhysicalLayoutBuilder:
        """Page-locked host memory; with ``numa_node``, its pages placed on that NUMA node
        (:mod:`~kvblocks.storage.numa`; the GPU's own, see ``numa.gpu_node``)."""
        if numa_node is not None:
            check_node(numa_node)
        return self._set_memory("pinned", numa_node)

    def allocate_system(self) -> PhysicalLayoutBuilder:
        return self._set_memory("system")

    def allocate_disk(
        self, path: str | os.PathLike, keep: bool = False, reuse: bool = False
    ) -> PhysicalLayoutBuilder:
        """A file at ``path`` (created, or truncated unless ``reuse``: then an existing file's
        bytes stay); deleted on release unless ``keep``."""
        return self._set_memory("disk", os.fspath(path), keep, reuse)

    def with_external_regions(self, tensors: Sequence[torch.Tensor]) -> PhysicalLayoutBuilder:
        """Use tensors an engine already owns (one per allocation the layout needs: one for a
        fully contiguous layout, one per layer for a layer-separate one, one per layer and
        outer chunk for an outer-separate one, in that order), without copying."""
        return self._set_memory("external", list(tensors))

    def with_remote_regions(self, regions: Sequence[MemoryRegion]) -> PhysicalLayoutBuilder:
        """Regions of another worker's memory, as its serialized layout describes them."""
        return self._set_memory("remote", list(regions))

    def _set_memory(self, kind: str, *args) -> PhysicalLayoutBuilder:
        if self._memory is not None:
            raise InvalidArgumentError(
                "memory", f"is already chosen ({self._memory[0]}); choose one kind of memory"
            )
        self._memory = (kind, *args)
        return self

    def build(self) -> PhysicalLayout:
        """Allocate (or wrap) the memory and return the layout.

        Raises:
            InvalidArgumentError: the layout type or the memory was not chosen.
            LayoutFormatError: a block format a layout of separate regions cannot hold.
            StorageError: the memory or the file cannot be allocated.
        """
        if self._kind is None:
            raise InvalidArgumentError(
                "layout type",
                "is not chosen: call fully_contiguous(), layer_separate() or outer_separate()",
            )
        if self._memory is None:
            raise InvalidArgumentError(
                "memory",
                "is not chosen: call allocate_device(), allocate_pinned(), allocate_system(),"
                " allocate_disk() or with_external_regions()",
            )
        layout_type = _LAYOUT_TYPES[self._kind]
        check_stored_format(self._kind, self._format)  # before anything is allocated
        sizes = layout_type.required_allocations(self._config)
        kind, *args = self._memory
        allocations = self._allocate(kind, args, sizes)
        try:
            if kind == "disk":
                regions = _file_segments(sizes)
            else:
                regions = [a.region for a in allocations]
            layout = self._layout(layout_type, regions)
        except Exception:
            for allocation in allocations:
                allocation.release()
            raise
        return PhysicalLayout(layout, allocations[0].kind, allocations)

    def _allocate(self, kind: str, args: list, sizes: list[int]) -> list[Allocation]:
        if kind == "device":
            return [allocate_device(size, args[0]) for size in sizes]
        if kind == "pinned":
            return [allocate_pinned(size, args[0]) for size in sizes]
        if kind == "system":
            return [allocate_system(size) for size in sizes]
        if kind == "disk":
            end = _file_segments(sizes)[-1].end
            return [DiskAllocation(args[0], end, keep=args[1], reuse=args[2])]
        if kind == "remote":
            return [RemoteAllocation(r) for r in args[0]]
        tensors = args[0]
        allocations = [wrap_tensor(t, f"tensors[{i}]") for i, t in enumerate(tensors)]
        kinds = {a.kind for a in allocations}
        if len(kinds) > 1:
            raise InvalidArgumentError(
                "tensors",
                f"must all be in one kind of memory, got {sorted(k.value for k in kinds)}",
            )
        return allocations

    def _layout(self, layout_type: type[Layout], regions: list[MemoryRegion]) -> Layout:
        if layout_type is FullyContiguousLayout:
            if len(regions) != 1:
                raise InvalidArgumentError(
                    "tensors",
                    f"must be one tensor for a fully contiguous layout, got {len(regions)}",
                )
            return FullyContiguousLayout(self._config, regions[0], self._format)
        if layout_type is OuterSeparateLayout:
            return OuterSeparateLayout(self._config, regions, self._format)
        return LayerSeparateLayout(self._config, regions, self._block_dim, self._format)


_LAYOUT_TYPES: dict[LayoutKind, type[Layout]] = {
    LayoutKind.FULLY_CONTIGUOUS: FullyContiguousLayout,
    LayoutKind.LAYER_SEPARATE: LayerSeparateLayout,
    LayoutKind.OUTER_SEPARATE: OuterSeparateLayout,
}


def _file_segments(sizes: list[int]) -> list[MemoryRegion]:
    """Consecutive page-aligned segments of one file, one per allocation."""
    segments, offset = [], 0
    for size in sizes:
        segments.append(MemoryRegion(offset, size))
        offset += -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
    return segments


@dataclass(frozen=True)
class KvBlocks:
    """Some blocks of one layout, with an optional override of how their bytes are ordered.

    Attributes:
        layout: the physical layout holding the blocks.
        block_ids: the blocks, in order.
        kv_layout: read the blocks as this format instead of the layout's own; for a layout
            of separate regions (not fully contiguous) it must be operational.
    """

    layout: PhysicalLayout
    block_ids: tuple[int, ...]
    kv_layout: KvBlockLayout | None = None

    def __init__(
        self,
        layout: PhysicalLayout,
        block_ids: Iterable[int],
        kv_layout: KvBlockLayout | None = None,
    ) -> None:
        try:
            ids = tuple(operator.index(b) for b in block_ids)
        except TypeError as exc:
            raise InvalidArgumentError("block_ids", f"must hold ints: {exc}") from None
        n = layout.config.num_blocks
        bad = [b for b in ids if not 0 <= b < n]
        if bad:
            raise BlockIdOutOfRangeError("block_ids", f"must be in [0, {n}), got {bad[0]}")
        if kv_layout is not None:
            if not layout.layout.is_fully_contiguous and not kv_layout.is_operational():
                raise LayoutFormatError(
                    "kv_layout",
                    f"must be operational for a {layout.layout.kind.label} layout,"
                    f" got {kv_layout.name}",
                )
            if kv_layout == layout.kv_format:
                kv_layout = None
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "block_ids", ids)
        object.__setattr__(self, "kv_layout", kv_layout)

    @property
    def effective_format(self) -> KvBlockLayout:
        """The override if given, else the layout's own format."""
        return self.kv_layout or self.layout.kv_format

    def requires_transform_to(self, other: KvBlocks) -> bool:
        """Whether moving these blocks into ``other`` needs a permute rather than a copy."""
        return self.effective_format.requires_transform(other.effective_format)

    def __len__(self) -> int:
        return len(self.block_ids)
