"""Host-to-device copies staged through device memory: the copy engine and the copy kernel
working together.

::

    pinned host spans --(copy engine, bulk)--> staging slot on the GPU --(copy kernel)--> pairs

The copy kernel reading pinned memory itself moves about 93% of what one bulk copy-engine
transfer does (SM-issued PCIe reads; ``docs/performance.md``), and the copy engine is slow for
many small pairs. Here the pairs' sources, in address order, are merged into spans contiguous
in host memory, which the copy engine moves in bulk into a staging slot; the copy kernel then
places each pair from the slot at device-copy speed. The pairs are cut into pieces of at most
``piece_bytes`` that go through two slots in turn, so that the kernel places piece ``i`` while
the copy engine fills the other slot with piece ``i + 1``.

Worth it where the sources form long runs in host memory (a fully contiguous layout, or a
layer-separate one read for consecutive block ids) and the copy is large (tens of MiB): pairs
scattered in host memory give the copy engine short spans, which it moves slowly, and a small
copy does not overlap the two steps for long.

Planning is a few vector operations over the pairs and never waits for the GPU, so a plan can
be made per transfer. On a machine without a GPU the same plan runs with ``memmove`` and the
copy kernel's CPU path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvblocks.errors import InvalidArgumentError
from kvblocks.kernels.addresses import (
    AddressTable,
    StridedTable,
    check_disjoint,
    common_alignment,
    host_table,
)
from kvblocks.kernels.backend import available, default_device
from kvblocks.kernels.copy import CopyPlan
from kvblocks.kernels.memcpy import MemcpyPlan, require_cuda_bindings
from kvblocks.layout import MemoryRegion

#: Bytes of one piece (and of one staging slot).
PIECE_BYTES = 32 << 20


class StagedPlan:
    """A validated staged copy (see the module documentation), ready to run any number of
    times.

    Pair ``i`` of the plan (in staging order) lands at ``dst[i]``; piece ``p`` holds pairs
    ``[p * per_piece, (p + 1) * per_piece)`` and is filled by the spans
    ``[bounds[p], bounds[p + 1])``. Holds its two staging slots (``2 * per_piece * size`` bytes
    of device memory at most).
    """

    def __init__(
        self,
        spans: tuple[list[int], list[int], list[int]],
        bounds: list[int],
        dst: torch.Tensor,
        size: int,
        per_piece: int,
        slots: torch.Tensor,
        align: int,
    ) -> None:
        self._span_src, self._span_offset, self._span_bytes = spans
        self._bounds = bounds
        self._dst = dst  # [num_pairs] int64 destination addresses, where the kernel runs
        self.size = size
        self.per_piece = per_piece
        self._slots = slots  # [2, per_piece * size] uint8 (one row when one piece)
        self._align = align
        device = slots.device
        self._backend = available(device)
        self._slot_bases = [torch.full((1,), row.data_ptr(), device=device) for row in slots]
        self._index = torch.arange(min(per_piece, dst.numel()), device=device)
        self._cuda = device.type == "cuda"
        self._filled = [torch.cuda.Event() for _ in slots] if self._cuda else []
        self._placed = [torch.cuda.Event() for _ in slots] if self._cuda else []
        self._ready = torch.cuda.Event() if self._cuda else None
        if self._cuda:  # the tables above are written on the current stream
            self._ready.record(torch.cuda.current_stream(device))

    @property
    def num_pieces(self) -> int:
        return len(self._bounds) - 1

    def fill(self, piece: int) -> MemcpyPlan:
        """The copy-engine copies of piece ``piece``: its host spans into its slot."""
        first, end = self._bounds[piece], self._bounds[piece + 1]
        base = self._slots[piece % len(self._slots)].data_ptr()
        return MemcpyPlan(
            self._span_src[first:end],
            [base + offset for offset in self._span_offset[first:end]],
            self._span_bytes[first:end],
            self._cuda,
        )

    def place(self, piece: int) -> CopyPlan:
        """The copy kernel of piece ``piece``: each of its pairs from the slot to its place."""
        pairs = self._dst[piece * self.per_piece : (piece + 1) * self.per_piece]
        bases = self._slot_bases[piece % len(self._slots)]
        slot = StridedTable(self._index[: pairs.numel()], bases, self.size)
        device = self._slots.device
        return CopyPlan(
            slot, StridedTable.flat(pairs), self.size, self._align, device, self._backend
        )

    def run(self, stream: torch.cuda.Stream | None = None) -> None:
        """Enqueue the copy: fills on a side stream, placements on ``stream`` (default: the
        current one), which the whole copy is ordered on, before and after. Runs of one plan
        share its slots: give them one stream (or streams ordered one after the other)."""
        if not self._cuda:
            for piece in range(self.num_pieces):
                self.fill(piece).run()
                self.place(piece).run()
            return
        main = stream or torch.cuda.current_stream(self._slots.device)
        main.wait_event(self._ready)
        side = torch.cuda.Stream(self._slots.device)
        side.wait_stream(main)  # after the sources are written and earlier runs placed
        for used_on in (main, side):  # the slots outlive this plan until both are done
            self._slots.record_stream(used_on)
        for piece in range(self.num_pieces):
            slot = piece % len(self._slots)
            if piece >= len(self._slots):
                side.wait_event(self._placed[slot])  # the kernel is done reading the slot
            self.fill(piece).run(batched=True, stream=side)
            self._filled[slot].record(side)
            main.wait_event(self._filled[slot])
            with torch.cuda.stream(main):
                self.place(piece).run()
            self._placed[slot].record(main)


def plan_staged_h2d(
    src_ptrs: AddressTable,
    dst_ptrs: AddressTable,
    size: int,
    src_allocations: Sequence[MemoryRegion],
    device: torch.device | str | None = None,
    piece_bytes: int | None = None,
    check_overlap: bool = True,
) -> StagedPlan:
    """Check ``num_pairs`` copies of ``size`` bytes from host memory (``src_ptrs``) to device
    memory (``dst_ptrs``) and plan them staged (see the module documentation).

    Args:
        src_allocations: the pinned allocations the sources lie in. A run of sources is cut
            where one allocation ends, even if the next begins there: the copy engine refuses
            a copy that spans two allocations.
        piece_bytes: bytes of a piece and of each of the two staging slots (default: 32 MiB,
            or ``size`` where that is larger).
        check_overlap: check that no destination overlaps another or a source (callers that
            know it, from block ids, skip the cost).

    Raises:
        InvalidArgumentError: tables of different lengths, a size that is not positive, a
            ``piece_bytes`` smaller than ``size``, a source outside ``src_allocations``, or
            destinations overlapping each other or a source.
        BackendUnavailableError: a GPU, and no cuda-bindings to drive its copy engines.
    """
    require_cuda_bindings()
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidArgumentError("size", f"must be a positive byte count, got {size!r}")
    if piece_bytes is None:
        piece_bytes = max(PIECE_BYTES, size)
    if isinstance(piece_bytes, bool) or not isinstance(piece_bytes, int) or piece_bytes < size:
        raise InvalidArgumentError(
            "piece_bytes", f"must be an int of at least size ({size}), got {piece_bytes!r}"
        )
    src = host_table(src_ptrs, "src_ptrs")
    dst = host_table(dst_ptrs, "dst_ptrs", length=src.numel())
    if check_overlap:
        sizes = torch.full_like(src, size)
        check_disjoint(src, sizes, dst, sizes, "src_ptrs", "dst_ptrs")
    device = torch.device(device) if device is not None else default_device()
    order = torch.argsort(src, stable=True)
    src, dst = src[order], dst[order]
    within = _allocation_of(src, size, src_allocations)
    n = src.numel()
    per_piece = min(piece_bytes // size, max(n, 1))
    index = torch.arange(n)
    piece = index // per_piece
    new_span = torch.ones(n, dtype=torch.bool)  # where a run of sources starts
    new_span[1:] = (
        (src[1:] != src[:-1] + size) | (within[1:] != within[:-1]) | (piece[1:] != piece[:-1])
    )
    first = new_span.nonzero().flatten()
    span_bytes = torch.diff(first, append=torch.tensor([n])) * size
    span_offset = (first % per_piece) * size
    pieces = -(-n // per_piece)
    bounds = torch.searchsorted(piece[first], torch.arange(pieces + 1)).tolist()
    slots = torch.empty((min(pieces, 2), per_piece * size), dtype=torch.uint8, device=device)
    align = common_alignment(dst, size, slots.data_ptr(), slots.stride(0))
    spans = (src[first].tolist(), span_offset.tolist(), span_bytes.tolist())
    return StagedPlan(spans, bounds, _to(dst, device), size, per_piece, slots, align)


def _to(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``table`` on ``device``, through pinned memory so that the host does not wait."""
    if device.type != "cuda":
        return table
    return table.pin_memory().to(device, non_blocking=True)


def _allocation_of(
    srcs: torch.Tensor, size: int, allocations: Sequence[MemoryRegion]
) -> torch.Tensor:
    """For each source, the index of the allocation (sorted by address) holding it."""
    regions = sorted(allocations, key=lambda r: r.addr)
    starts = torch.tensor([r.addr for r in regions], dtype=torch.int64)
    ends = torch.tensor([r.end for r in regions], dtype=torch.int64)
    found = torch.searchsorted(starts, srcs, right=True) - 1
    inside = (found >= 0) & (srcs + size <= ends[found.clamp(min=0)])
    if not bool(inside.all()):
        bad = int(srcs[~inside][0])
        raise InvalidArgumentError(
            "src_ptrs",
            f"has {bad:#x} (+{size} bytes), which no allocation of src_allocations holds",
        )
    return found
