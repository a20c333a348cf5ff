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

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvblocks.errors import InvalidArgumentError
from kvblocks.kernels.addresses import AddressTable, check_disjoint, host_table
from kvblocks.kernels.backend import default_device
from kvblocks.kernels.copy import CopyPlan, plan_copy
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
) -> StagedPlan:
    """Check ``num_pairs`` copies of ``size`` bytes from host memory (``src_ptrs``) to device
    memory (``dst_ptrs``) and plan them staged (see the module documentation).

    Args:
        src_allocations: the pinned allocations the sources lie in. A run of sources is cut
            where one allocation ends, even if the next begins there: the copy engine refuses
            a copy that spans two allocations.
        piece_bytes: bytes of a piece and of each of the two staging slots (default: 32 MiB,
            or ``size`` where that is larger).

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
    sizes = torch.full_like(src, size)
    check_disjoint(src, sizes, dst, sizes, "src_ptrs", "dst_ptrs")
    device = torch.device(device) if device is not None else default_device()
    order = torch.argsort(src, stable=True)
    srcs = src[order].tolist()
    within = _allocation_of(srcs, size, src_allocations)
    limit = piece_bytes // size * size
    pieces = _cut(srcs, dst[order].tolist(), within, size, limit)
    slot_bytes = max((p[2] for p in pieces), default=0)
    slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in pieces[:2]]
    plans = []
    for i, (spans, pairs, _) in enumerate(pieces):
        base = slots[i % len(slots)].data_ptr()
        fill = plan_memcpy(
            [s for s, _, _ in spans], [base + o for _, _, o in spans], [n for _, n, _ in spans]
        )
        place = plan_copy(
            [base + o for o, _ in pairs], [d for _, d in pairs], size, device, check_overlap=False
        )
        plans.append(_Piece(fill, place))
    return StagedPlan(plans, slots)


def _allocation_of(srcs: list[int], size: int, allocations: Sequence[MemoryRegion]) -> list[int]:
    """For each source (sorted), the index of the allocation (sorted by address) holding it."""
    regions = sorted(allocations, key=lambda r: r.addr)
    starts = [r.addr for r in regions]
    found = []
    for s in srcs:
        i = bisect.bisect_right(starts, s) - 1
        if i < 0 or s + size > regions[i].end:
            raise InvalidArgumentError(
                "src_ptrs",
                f"has {s:#x} (+{size} bytes), which no allocation of src_allocations holds",
            )
        found.append(i)
    return found


def _cut(srcs: list[int], dsts: list[int], within: list[int], size: int, limit: int):
    """Pieces of pairs sorted by source: ``(spans, pairs, bytes)``, where a span is ``(host
    address, bytes, slot offset)`` and a pair ``(slot offset, destination)``. A span stays in
    one allocation (``within[i]`` is pair ``i``'s)."""
    pieces, spans, pairs, used = [], [], [], 0
    for i, (s, d) in enumerate(zip(srcs, dsts, strict=True)):
        if used + size > limit:
            pieces.append((spans, pairs, used))
            spans, pairs, used = [], [], 0
        last = spans[-1] if spans else None
        if last is not None and last[0] + last[1] == s and within[i] == within[i - 1]:
            spans[-1] = (last[0], last[1] + size, last[2])
        else:
            spans.append((s, size, used))
        pairs.append((used, d))
        used += size
    if pairs:
        pieces.append((spans, pairs, used))
    return pieces
