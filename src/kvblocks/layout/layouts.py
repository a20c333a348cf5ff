"""Layouts: where each ``(block, layer, outer)`` region of a set of blocks lives in memory.

A layout is pure address arithmetic over allocations someone else made (the storage layer,
or an engine that owns its KV cache tensors). Three kinds exist (:class:`LayoutKind`):

``FullyContiguousLayout``, one allocation shaped ``[num_blocks, nl, no, page_size * inner_dim]``::

    addr(b, l, o) = base + ((b * nl + l) * no + o) * region_bytes

``LayerSeparateLayout``, one allocation per layer, as vLLM keeps its paged caches,
each block-first ``[num_blocks, no, region]`` or outer-first ``[no, num_blocks, region]``::

    block-first: addr(b, l, o) = base[l] + (b * no + o) * region_bytes
    outer-first: addr(b, l, o) = base[l] + (o * num_blocks + b) * region_bytes

``OuterSeparateLayout``, one allocation per layer and outer chunk, ``nl * no`` in all (layer 0's
K, layer 0's V, layer 1's K, ...), each ``[num_blocks, region]``, as SGLang keeps its K and V
buffers::

    addr(b, l, o) = base[l * no + o] + b * region_bytes

All are affine in the block id, ``addr(b, l, o) = b * block_stride + chunk_offset(l, o)``,
which is how the address tables below are built.

Address tables are what kernels consume: flat ``int64`` arrays, block-major, then layer, then
outer (entry ``(i * len(layers) + l) * no + o`` is block ``block_ids[i]``, layer ``layers[l]``,
outer ``o``). They are returned as ``array('q')``, which ``torch.frombuffer`` wraps without a copy.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from kvblocks.checks import index_in_range
from kvblocks.errors import (
    BlockIdOutOfRangeError,
    InvalidArgumentError,
    LayoutFormatError,
    LengthMismatchError,
    ShapeMismatchError,
)
from kvblocks.layout.block_format import KvBlockLayout
from kvblocks.layout.config import LayoutConfig


@dataclass(frozen=True)
class MemoryRegion:
    """A span of bytes: start address and size in bytes."""

    addr: int
    size: int

    def __post_init__(self) -> None:
        if isinstance(self.addr, bool) or not isinstance(self.addr, int) or self.addr < 0:
            raise InvalidArgumentError("addr", f"must be a non-negative int, got {self.addr!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise InvalidArgumentError("size", f"must be a non-negative int, got {self.size!r}")

    @classmethod
    def of(cls, tensor: torch.Tensor) -> MemoryRegion:
        """The bytes a contiguous tensor occupies (its storage must outlive the region's use).

        Raises:
            InvalidArgumentError: the tensor is not contiguous (its bytes are not one span).
        """
        if not tensor.is_contiguous():
            raise InvalidArgumentError("tensor", "must be contiguous to be one memory region")
        return cls(tensor.data_ptr(), tensor.numel() * tensor.element_size())

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.addr + self.size

    def overlaps(self, other: MemoryRegion) -> bool:
        """Whether the two spans share at least one byte."""
        return self.addr < other.end and other.addr < self.end


class LayoutKind(Enum):
    """Which :class:`Layout` subclass: how many allocations hold the blocks, and how."""

    FULLY_CONTIGUOUS = "fully_contiguous"
    """One allocation (:class:`FullyContiguousLayout`)."""
    LAYER_SEPARATE = "layer_separate"
    """One allocation per layer (:class:`LayerSeparateLayout`)."""
    OUTER_SEPARATE = "outer_separate"
    """One allocation per layer and outer chunk (:class:`OuterSeparateLayout`)."""

    @property
    def label(self) -> str:
        """The kind in words, e.g. ``layer-separate``."""
        return self.value.replace("_", "-")


def check_stored_format(kind: LayoutKind, kv_format: KvBlockLayout) -> None:
    """Raise ``LayoutFormatError`` unless a layout of ``kind`` can hold blocks of ``kv_format``:
    any format in one contiguous span, only operational (or unknown) ones as separate regions.
    """
    if kind is LayoutKind.FULLY_CONTIGUOUS or kv_format.dim_order is None:
        return
    if not kv_format.is_operational():
        raise LayoutFormatError(
            "kv_format",
            f"must be operational (NHD or HND) or Unknown for a {kind.label} layout,"
            f" got {kv_format.name}",
        )


class BlockDimension(Enum):
    """Where the block index sits in each layer's allocation of a layer-separate layout."""

    BLOCK_FIRST = "block_first"
    """Each layer is ``[num_blocks, no, page_size, inner_dim]`` (vLLM's FlashInfer cache)."""
    OUTER_FIRST = "outer_first"
    """Each layer is ``[no, num_blocks, page_size, inner_dim]``: K pages, then V pages (vLLM's
    FlashAttention cache)."""


def layer_range(layers: range | None, num_layers: int) -> range:
    """``layers`` checked against ``num_layers`` (``None`` means all layers).

    Raises:
        InvalidArgumentError, BlockIdOutOfRangeError: not a non-empty step-1 range inside
            ``range(num_layers)``.
    """
    if layers is None:
        return range(num_layers)
    if not isinstance(layers, range) or layers.step != 1:
        raise InvalidArgumentError("layers", f"must be a range with step 1, got {layers!r}")
    if len(layers) == 0 or layers.start < 0 or layers.stop > num_layers:
        raise BlockIdOutOfRangeError(
            "layers", f"must be a non-empty range within [0, {num_layers}), got {layers!r}"
        )
    return layers


def _block_id_list(block_ids: Iterable[int], num_blocks: int, argument: str) -> list[int]:
    try:
        ids = [operator.index(b) for b in block_ids]
    except TypeError as exc:
        raise InvalidArgumentError(argument, f"must hold ints: {exc}") from None
    if ids and (min(ids) < 0 or max(ids) >= num_blocks):
        bad = next(b for b in ids if not 0 <= b < num_blocks)
        raise BlockIdOutOfRangeError(argument, f"must be in [0, {num_blocks}), got {bad}")
    return ids


class Layout(ABC):
    """Maps ``(block_id, layer_id, outer_id)`` to a :class:`MemoryRegion`.

    Attributes:
        config: the sizes.
        kv_format: the order of dims inside a block (see :class:`KvBlockLayout`).
        memory: the allocations this layout addresses, in the order
            :meth:`required_allocations` lists them.
    """

    config: LayoutConfig
    kv_format: KvBlockLayout
    memory: tuple[MemoryRegion, ...]
    #: Which subclass this is.
    kind: LayoutKind

    def __init__(
        self, config: LayoutConfig, memory: Sequence[MemoryRegion], kv_format: KvBlockLayout
    ) -> None:
        if not isinstance(kv_format, KvBlockLayout):
            raise LayoutFormatError("kv_format", f"must be a KvBlockLayout, got {kv_format!r}")
        required = self.required_allocations(config)
        memory = tuple(memory)
        if len(memory) != len(required):
            raise LengthMismatchError(
                "memory",
                f"must hold {len(required)} allocations for this layout, got {len(memory)}",
            )
        for i, (region, need) in enumerate(zip(memory, required, strict=True)):
            if not isinstance(region, MemoryRegion):
                raise InvalidArgumentError(
                    f"memory[{i}]", f"must be a MemoryRegion, got {region!r}"
                )
            if region.size < need:
                raise ShapeMismatchError(
                    f"memory[{i}]", f"is {region.size} bytes, the layout needs {need}"
                )
        self.config = config
        self.kv_format = kv_format
        self.memory = memory

    @staticmethod
    @abstractmethod
    def required_allocations(config: LayoutConfig) -> list[int]:
        """Bytes of each allocation a layout of ``config`` needs."""

    @property
    def is_fully_contiguous(self) -> bool:
        """Whether every block is one contiguous span."""
        return self.kind is LayoutKind.FULLY_CONTIGUOUS

    @property
    @abstractmethod
    def block_stride(self) -> int:
        """Bytes between the same region of block ``b`` and block ``b + 1``."""

    @abstractmethod
    def _chunk_offset(self, layer_id: int, outer_id: int) -> int:
        """Address of region ``(0, layer_id, outer_id)``."""

    def _check_regions_addressable(self) -> None:
        if self.kv_format.dim_order is not None and not self.kv_format.is_operational():
            raise LayoutFormatError(
                "kv_format",
                f"is {self.kv_format.name}: its (layer, outer) slices are not contiguous regions;"
                " address whole blocks instead",
            )

    def region(self, block_id: int, layer_id: int, outer_id: int) -> MemoryRegion:
        """The bytes of one layer's K (``outer_id=0``) or V (``outer_id=1``) of one block.

        Raises:
            BlockIdOutOfRangeError: an index is outside the config.
            LayoutFormatError: the blocks are in a format whose regions are not contiguous.
        """
        self._check_regions_addressable()
        cfg = self.config
        index_in_range(block_id, cfg.num_blocks, "block_id")
        index_in_range(layer_id, cfg.num_layers, "layer_id")
        index_in_range(outer_id, cfg.outer_dim, "outer_id")
        addr = block_id * self.block_stride + self._chunk_offset(layer_id, outer_id)
        return MemoryRegion(addr, cfg.region_bytes)

    def region_table(self, block_ids: Iterable[int], layers: range | None = None) -> array:
        """Addresses of every region of ``block_ids``: ``len(block_ids) * len(layers) * no``
        int64 entries, block-major, then layer, then outer.

        Args:
            block_ids: blocks to list, in order; repeats allowed.
            layers: the layers to include (default all), a ``range`` with step 1.

        Raises:
            BlockIdOutOfRangeError: a block id or a layer is outside the config.
        """
        ids = _block_id_list(block_ids, self.config.num_blocks, "block_ids")
        offsets = self.chunk_offsets(layers)
        stride = self.block_stride
        return array("q", [b * stride + off for b in ids for off in offsets])

    def chunk_offsets(self, layers: range | None = None) -> list[int]:
        """Address of region ``(0, l, o)`` for each layer in ``layers`` and each outer, in table
        order; region ``(b, l, o)`` is ``b * block_stride`` further on."""
        self._check_regions_addressable()
        return [
            self._chunk_offset(l, o)
            for l in self.layer_range(layers)
            for o in range(self.config.outer_dim)
        ]

    def layer_range(self, layers: range | None) -> range:
        """``layers`` checked against the config (``None`` means all layers); see
        :func:`layer_range`."""
        return layer_range(layers, self.config.num_layers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config}, kv_format={self.kv_format.name})"


class FullyContiguousLayout(Layout):
    """All blocks in one allocation, ``[num_blocks, nl, no, page_size * inner_dim]``.

    Every block is one contiguous span of ``config.block_bytes`` bytes, so any block format
    can be stored; the per-region API needs an operational (or unknown) format.
    """

    kind = LayoutKind.FULLY_CONTIGUOUS

    def __init__(
        self,
        config: LayoutConfig,
        memory: MemoryRegion,
        kv_format: KvBlockLayout = KvBlockLayout.Unknown,
    ) -> None:
        super().__init__(config, (memory,), kv_format)

    @staticmethod
    def required_allocations(config: LayoutConfig) -> list[int]:
        return [config.total_bytes]

    @property
    def block_stride(self) -> int:
        return self.config.block_bytes

    def _chunk_offset(self, layer_id: int, outer_id: int) -> int:
        cfg = self.config
        return self.memory[0].addr + (layer_id * cfg.outer_dim + outer_id) * cfg.region_bytes

    def chunk_offsets(self, layers: range | None = None) -> list[int]:
        self._check_regions_addressable()
        layers = self.layer_range(layers)
        cfg = self.config
        step = cfg.region_bytes
        first = self.memory[0].addr + layers.start * cfg.outer_dim * step
        return list(range(first, first + len(layers) * cfg.outer_dim * step, step))

    def block_region(self, block_id: int) -> MemoryRegion:
        """The whole of one block."""
        index_in_range(block_id, self.config.num_blocks, "block_id")
        return MemoryRegion(self.memory[0].addr + block_id * self.block_stride, self.block_stride)

    def block_table(self, block_ids: Iterable[int]) -> array:
        """Start address of each of ``block_ids``: one int64 entry per block."""
        ids = _block_id_list(block_ids, self.config.num_blocks, "block_ids")
        base, stride = self.memory[0].addr, self.block_stride
        return array("q", [base + b * stride for b in ids])


class _SeparateRegionsLayout(Layout):
    """A layout whose blocks are ``nl * no`` separate regions (a "block stack"), so the block
    format must be operational (its regions are ``[nt, nh, hd]`` or ``[nh, nt, hd]``) or
    unknown."""

    def __init__(
        self,
        config: LayoutConfig,
        memory: Sequence[MemoryRegion],
        kv_format: KvBlockLayout = KvBlockLayout.Unknown,
    ) -> None:
        check_stored_format(self.kind, kv_format)
        super().__init__(config, memory, kv_format)


class LayerSeparateLayout(_SeparateRegionsLayout):
    """One allocation per layer, each ``[num_blocks, no, region]`` or ``[no, num_blocks, region]``;
    the block format must be operational or unknown."""

    kind = LayoutKind.LAYER_SEPARATE

    def __init__(
        self,
        config: LayoutConfig,
        memory: Sequence[MemoryRegion],
        block_dim: BlockDimension = BlockDimension.BLOCK_FIRST,
        kv_format: KvBlockLayout = KvBlockLayout.Unknown,
    ) -> None:
        if not isinstance(block_dim, BlockDimension):
            raise InvalidArgumentError("block_dim", f"must be a BlockDimension, got {block_dim!r}")
        super().__init__(config, memory, kv_format)
        self.block_dim = block_dim

    @staticmethod
    def required_allocations(config: LayoutConfig) -> list[int]:
        per_layer = config.num_blocks * config.outer_dim * config.region_bytes
        return [per_layer] * config.num_layers

    @property
    def block_stride(self) -> int:
        cfg = self.config
        if self.block_dim is BlockDimension.BLOCK_FIRST:
            return cfg.outer_dim * cfg.region_bytes
        return cfg.region_bytes

    @property
    def outer_stride(self) -> int:
        """Bytes between a block's K region and its V region within one layer."""
        cfg = self.config
        if self.block_dim is BlockDimension.BLOCK_FIRST:
            return cfg.region_bytes
        return cfg.num_blocks * cfg.region_bytes

    def _chunk_offset(self, layer_id: int, outer_id: int) -> int:
        return self.memory[layer_id].addr + outer_id * self.outer_stride


class OuterSeparateLayout(_SeparateRegionsLayout):
    """One allocation per layer and outer chunk, ``nl * no`` in all, in the order layer 0's
    outer 0 (K), layer 0's outer 1 (V), layer 1's outer 0, ...; each ``[num_blocks, region]``.
    The block format must be operational or unknown."""

    kind = LayoutKind.OUTER_SEPARATE

    @staticmethod
    def required_allocations(config: LayoutConfig) -> list[int]:
        return [config.num_blocks * config.region_bytes] * (config.num_layers * config.outer_dim)

    @property
    def block_stride(self) -> int:
        return self.config.region_bytes

    def _chunk_offset(self, layer_id: int, outer_id: int) -> int:
        return self.memory[layer_id * self.config.outer_dim + outer_id].addr
