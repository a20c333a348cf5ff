"""Host-to-device copies staged through device memory: the copy engine and the copy kernel
working together.

::

    pinned host spans --(copy engine, bulk)--> staging slot on the GPU --(copy kernel)--> pairs

The copy kernel reading pinned memory itself moves about 93% of what one bulk copy-engine
transfer does (SM-issued PCIe reads; ``docs/performance.md``), and the copy engine is slow for
many small pairs. Here the pairs' sources, sorted by address, are merged into spans contiguous
in host memory, which the copy engine moves in bulk into a staging slot; the copy kernel then
places each pair from the slot at device-copy speed. The spans are cut into pieces of at most
``piece_bytes`` (at pair boundaries) that go through two slots in turn, so that the kernel
places piece ``i`` while the copy engine fills the other slot with piece ``i + 1``.

Worth it where the sources form long runs in host memory (a fully contiguous layout, or a
layer-separate one read for consecutive block ids); pairs scattered in host memory give the
copy engine short spans, which it moves slowly.

On a machine without a GPU the same plan runs with ``memmove`` and the copy kernel's CPU path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
from kvblocks.kernels.memcpy import MemcpyPlan, plan_memcpy
from kvblocks.layout import MemoryRegion

#: Bytes of one piece (and of one staging slot).
PIECE_BYTES = 32 << 20


@dataclass(frozen=True)
class _Piece:
    fill: MemcpyPlan
    """Host spans into the piece's slot, through the copy engine."""
    place: CopyPlan
    """Each pair from the slot to its destination, through the copy kernel."""


class StagedPlan:
    """A validated staged copy (see the module documentation), ready to run any number of
    times. Holds its two staging slots (``2 * piece_bytes`` of device memory at most)."""

    def __init__(self, pieces: list[_Piece], slots: list[torch.Tensor]) -> None:
        self.pieces = pieces
        self._slots = slots  # the memory the plans point into
        cuda = bool(slots) and slots[0].device.type == "cuda"
        self._side = torch.cuda.Stream(slots[0].device) if cuda else None
        self._filled = [torch.cuda.Event() for _ in slots] if cuda else []
        self._placed = [torch.cuda.Event() for _ in slots] if cuda else []

    def run(self, stream: torch.cuda.Stream | None = None) -> None:
        """Enqueue the copy: fills on a side stream, placements on ``stream`` (default: the
        current one), which the whole copy is ordered on, before and after. Runs of one plan
        share its slots: give them one stream (or streams ordered one after the other)."""
        if self._side is None:
            for piece in self.pieces:
                piece.fill.run()
                piece.place.run()
            return
        main = stream or torch.cuda.current_stream(self._slots[0].device)
        side = self._side
        side.wait_stream(main)  # after the sources are written and earlier runs placed
        for i, piece in enumerate(self.pieces):
            slot = i % len(self._slots)
            if i >= len(self._slots):
                side.wait_event(self._placed[slot])  # the kernel is done reading the slot
            piece.fill.run(batched=True, stream=side)
            self._filled[slot].record(side)
            main.wait_event(self._filled[slot])
            with torch.cuda.stream(main):
                piece.place.run()
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
    """
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
    srcs, dsts = src[order], dst[order]
    within = _allocation_of(srcs, size, src_allocations)
    per_piece = piece_bytes // size
    n = srcs.numel()
    index = torch.arange(n)
    piece = index // per_piece
    offset = (index % per_piece) * size  # in the piece's slot
    new_span = torch.ones(n, dtype=torch.bool)  # where a run of sources starts
    new_span[1:] = (
        (srcs[1:] != srcs[:-1] + size) | (within[1:] != within[:-1]) | (piece[1:] != piece[:-1])
    )
    first = new_span.nonzero().flatten()
    span_bytes = torch.diff(first, append=torch.tensor([n])) * size
    pieces = -(-n // per_piece)
    bounds = torch.searchsorted(piece[first], torch.arange(pieces + 1)).tolist()
    slot_bytes = min(n, per_piece) * size
    slots = [
        torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(min(pieces, 2))
    ]
    bases = torch.tensor([t.data_ptr() for t in slots], dtype=torch.int64)
    staged = bases[piece % 2] + offset
    place_src = staged.to(device)
    place_dst = dsts.to(device)
    align = common_alignment(torch.cat([staged, dsts]), size)
    backend = available(device)
    plans = []
    for p in range(pieces):
        spans = first[bounds[p] : bounds[p + 1]]
        fill = plan_memcpy(
            srcs[spans], bases[p % 2] + offset[spans], span_bytes[bounds[p] : bounds[p + 1]]
        )
        part = slice(p * per_piece, min(n, (p + 1) * per_piece))
        place = CopyPlan(
            StridedTable.flat(place_src[part]),
            StridedTable.flat(place_dst[part]),
            size,
            align,
            device,
            backend,
        )
        plans.append(_Piece(fill, place))
    return StagedPlan(plans, slots)


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
