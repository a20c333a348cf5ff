"""Transfers staged through device memory (``Strategy.STAGED``), a few blocks at a time.

::

    into the GPU:   pinned blocks --(copy engine)--> slot --(copy or permute kernel)--> layout
    out of the GPU: layout --(copy or permute kernel)--> slot --(copy engine)--> pinned blocks

A kernel reading or writing pinned memory itself crosses PCIe at about 93% (reads) or 95%
(writes) of what the copy engine moves in bulk (``docs/performance.md``), and the copy engine
is slow for the many small regions of an engine's layer-separate cache. Staged, each of them
does what it is fast at: the copy engine moves whole pinned blocks (one span each) between
host memory and a slot of device memory, and the kernel places the slot's blocks into the
device layout, or gathers them from it, at device-memory speed.

The blocks go in pieces of ``blocks_per_piece`` through two slots in turn, so that the kernel
works on one slot while the copy engine fills or drains the other: the copy engine sets the
pace, and the kernel adds only its time for the last piece. Every step is enqueued on CUDA
streams with GPU-side waits. The pieces' copies go on one copy stream, or where they are many
round a set of them, each piece's after the last one's: a stream holds about a thousand
queued copies before the host blocks on it (H100), and scattered pinned blocks make a copy
per block and layer group.

A transfer of some layers of each block, changing their format on the way (an engine taking a
block's first layers before the rest), is staged too: the slots' blocks hold those layers only,
and the copy engine moves them as rows at a fixed pitch, one ``cudaMemcpy2DAsync`` per run of
neighbouring blocks. In a block of format ``[d0, ..., nl, ..., hd]`` the dims before the layer
dim give the rows, and each row holds every layer's run of the bytes after it, so the moved
layers are one stretch of each row (``UniversalTP``: ``nh`` rows per block; ``UniversalPP``
and the operational formats: one).

Layer groups (``TransferManager.execute_layer_groups``) go through one set of slots, group
after group, each group's pieces right behind the previous group's, with an event at the end
of each group.

The host plans in Python lists and enqueues through :mod:`~kvblocks.kernels.cuda_calls`:
every torch op and torch stream call lets the GIL go, and beside a Python thread that never
blocks each of them waits up to a switch interval (5 ms) to have it back. What is left per
piece is its kernel's launch.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from kvblocks.errors import LayoutFormatError
from kvblocks.kernels import CopyPlan, Operand, PermutePlan
from kvblocks.kernels.addresses import StridedTable, host_ids
from kvblocks.kernels.cuda_calls import StreamEvent
from kvblocks.kernels.memcpy import MemcpyPlan, PitchedCopyPlan
from kvblocks.layout import BlockDim, FullyContiguousLayout, KvBlockLayout, LayoutConfig
from kvblocks.storage import MemoryAllocation, PhysicalLayout, StorageKind
from kvblocks.transfer.executor import Side, dims_of, gpu_plan, permute_tables

#: Bytes of blocks in one slot, at most (a slot holds one block at least).
PIECE_BYTES = 64 << 20
#: Copies one copy stream is given, at most: a stream holds about a thousand queued copies
#: before the host blocks on it (H100).
COPIES_PER_STREAM = 256


def blocks_per_piece(side: Side, layers: range | None = None) -> int:
    """Blocks of ``side`` moved per piece when layers ``layers`` (default: all) of each move:
    as many as fit in ``PIECE_BYTES``, at least one, at most all of them."""
    moved = _moved(side.config, layers).block_bytes
    return max(1, min(side.ids.numel(), PIECE_BYTES // moved))


def slot_config(side: Side, layers: range | None = None) -> LayoutConfig:
    """The blocks of the slots that the staged transfer of layers ``layers`` (default: all)
    of ``side``'s blocks goes through: blocks of those layers only, two slots of
    :func:`blocks_per_piece` blocks, or one when a single piece holds every block."""
    per_piece = blocks_per_piece(side, layers)
    slots = 1 if per_piece == side.ids.numel() else 2
    return replace(_moved(side.config, layers), num_blocks=slots * per_piece)


def slot_bytes(side: Side, groups: Sequence[range]) -> int:
    """Bytes of device memory that the staged transfer of layer groups ``groups`` of
    ``side``'s blocks goes through: the largest group's :func:`slot_config`."""
    return max(slot_config(side, layers).total_bytes for layers in groups)


def _moved(config: LayoutConfig, layers: range | None) -> LayoutConfig:
    """``config`` with only the moved layers ``layers`` (all for ``None``)."""
    return config if layers is None else replace(config, num_layers=len(layers))


def slot_layout(config: LayoutConfig, fmt: KvBlockLayout, buffer: torch.Tensor) -> PhysicalLayout:
    """The slots of ``config`` (from :func:`slot_config`), fully contiguous at the start of
    ``buffer`` (``uint8`` device memory of at least ``config.total_bytes``), in ``fmt``."""
    allocation = MemoryAllocation(StorageKind.DEVICE, buffer[: config.total_bytes], owned=False)
    layout = FullyContiguousLayout(config, allocation.region, fmt)
    return PhysicalLayout(layout, StorageKind.DEVICE, (allocation,))


#: The slots of a :func:`slot_config`, laid out by :func:`slot_layout` over one buffer.
SlotLayouts = Callable[[LayoutConfig], PhysicalLayout]


def run_staged(
    src: Side,
    dst: Side,
    slots: SlotLayouts,
    stream: torch.cuda.Stream | None,
    copy_streams: Sequence[torch.cuda.Stream],
    groups: Sequence[range] | None = None,
) -> list[StreamEvent]:
    """Move blocks ``src.ids`` into ``dst.ids`` through slots, one layer group after another
    (default: every layer at once).

    One side is device memory and the other pinned memory, fully contiguous (the copy engine
    moves whole blocks, or the same stretch of each row of them); the slots hold blocks in the
    pinned side's format, of the moved layers only, so that the copy engine moves them
    unchanged. The caller has checked the block ids (in range, no destination twice) and
    the groups' layers.

    Args:
        slots: the :func:`slot_layout` of a :func:`slot_config` (of ``src`` and a group), in
            the pinned side's format, over one buffer of :func:`slot_bytes` that nothing else
            uses until the transfer is done.
        stream: the stream the kernels run on and the transfer is ordered on, before and
            after: it must already follow the work the transfer waits for, and work queued on
            it later sees the transfer done. ``None`` on a machine without a GPU, where every
            step runs at once, in order.
        copy_streams: streams for the copy engine's steps, used in turn, as many as the
            copies need (none without a GPU).
        groups: layer ranges, moved in this order.

    Returns:
        Per group, an event that completes once its layers are in place (none without a
        GPU).

    Raises:
        LayoutFormatError: the pinned side is not fully contiguous; nothing was moved.
    """
    into_gpu = dst.physical.storage is StorageKind.DEVICE
    pinned, name = (src, "src") if into_gpu else (dst, "dst")
    if not pinned.physical.layout.is_fully_contiguous:  # the copy engine moves rows of blocks
        raise LayoutFormatError(
            name, f"must be fully contiguous to be staged, got {pinned.physical.layout.kind.label}"
        )
    groups = (range(src.config.num_layers),) if groups is None else groups
    steps = _steps(src, dst, slots, groups, into_gpu)
    if stream is None:
        for step in steps:
            for work in (step.copies, step.kernel) if into_gpu else (step.kernel, step.copies):
                work().run()
        return []
    count = sum(step.group.copies.count(step.first, step.end) for step in steps)
    copy_streams = copy_streams[: max(1, min(len(copy_streams), -(-count // COPIES_PER_STREAM)))]
    copies = _CopyOrder(copy_streams, StreamEvent.recorded(stream))
    if into_gpu:  # every kernel waited for its copies
        return _into_gpu(steps, stream, copies)
    done = _out_of_gpu(steps, stream, copies)
    copies.copied[-1].wait(stream)  # the last copies came after all others
    return done


def _steps(
    src: Side, dst: Side, slots: SlotLayouts, groups: Sequence[range], into_gpu: bool
) -> list[_Step]:
    """The pieces of each layer group in turn. The blocks go in the order of their pinned
    ids, so that neighbours in pinned memory are neighbours in the slots too and go as one
    copy (a pool hands out runs of ids, in any order)."""
    pinned = (src if into_gpu else dst).ids.tolist()
    if any(a > b for a, b in zip(pinned, pinned[1:], strict=False)):
        order = sorted(range(len(pinned)), key=pinned.__getitem__)
        src, dst = (replace(side, ids=_reordered(side.ids, order)) for side in (src, dst))
    pinned_at = _block_addresses(src if into_gpu else dst)
    return [
        _Step(group, first, end)
        for group in (_Group(src, dst, layers, slots, pinned_at, into_gpu) for layers in groups)
        for first, end in group.pieces()
    ]


class _Group:
    """One layer group of a staged transfer: its slots, the copy engine's copies between them
    and the pinned blocks, and the kernel between them and the device layout (planned at its
    first use, so that the first copies are on their way meanwhile)."""

    def __init__(
        self,
        src: Side,
        dst: Side,
        layers: range,
        slots: SlotLayouts,
        pinned_at: list[int],
        into_gpu: bool,
    ) -> None:
        self.layers = layers
        self.per_piece = blocks_per_piece(src, layers)
        physical = slots(slot_config(src, layers))
        # Block i of the transfer goes through block (i % per_piece) of slot
        # (i // per_piece) % 2.
        per = self.per_piece
        slot_ids = [(i // per % 2) * per + i % per for i in range(src.ids.numel())]
        self.slot = Side(physical, host_ids(slot_ids), physical.kv_format)
        pinned = src if into_gpu else dst
        self.copies = _Copies(pinned, pinned_at, self.slot, layers, self.per_piece, into_gpu)
        self._ends = (self.slot, dst) if into_gpu else (src, self.slot)
        self._kernel: CopyPlan | PermutePlan | None = None

    def pieces(self) -> list[tuple[int, int]]:
        """``(first, end)`` of each piece's blocks, in order."""
        n = self.slot.ids.numel()
        return [(first, min(first + self.per_piece, n)) for first in range(0, n, self.per_piece)]

    def kernel(self) -> CopyPlan | PermutePlan:
        """The kernel between the slots and the device layout, for every block."""
        if self._kernel is None:
            self._kernel = _kernel(*self._ends, self.layers, self.slot.physical.device)
        return self._kernel


@dataclass(frozen=True)
class _Step:
    """One piece of one layer group: blocks ``[first, end)`` of the transfer."""

    group: _Group
    first: int
    end: int

    def copies(self) -> MemcpyPlan | PitchedCopyPlan:
        return self.group.copies.part(self.first, self.end)

    def kernel(self) -> CopyPlan | PermutePlan:
        return _part(self.group.kernel(), self.first, self.end)


def _slot_of(step: _Step) -> int:
    """Which of its group's two slots ``step`` goes through: its piece's number, mod 2."""
    return step.first // step.group.per_piece % 2


def _behind(steps: list[_Step], i: int) -> int:
    """How many steps before step ``i`` the last one is that used the memory of its slot
    (``i + 1`` where none did): the nearest one through the same slot of the same slot
    layout, or through slots laid out anew (for blocks of another size, which may overlap
    both slots of before). Within a group that is two steps back; a group's first piece
    goes through slot 0, which the previous group's last piece used too where that group
    had an odd number of pieces."""
    step = steps[i]
    for k in range(i - 1, -1, -1):
        before = steps[k]
        anew = before.group.slot.physical is not step.group.slot.physical
        if anew or _slot_of(before) == _slot_of(step):
            return i - k
    return i + 1


class _CopyOrder:
    """Enqueues the steps' copies round ``streams``, the first step's after ``start``, each
    later step's after the previous step's (and after an event it names), and records when
    each step's copies end."""

    def __init__(self, streams: Sequence[torch.cuda.Stream], start: StreamEvent) -> None:
        self._streams = streams
        self._start = start
        self.copied: list[StreamEvent] = []

    def run(self, step: _Step, after: StreamEvent | None) -> None:
        """Enqueue ``step``'s copies behind ``after`` (None: nothing more to wait for)."""
        i = len(self.copied)
        copy_stream = self._streams[i % len(self._streams)]
        if after is not None:
            after.wait(copy_stream)
        if i == 0:
            self._start.wait(copy_stream)
        elif len(self._streams) > 1:  # one stream keeps the order by itself
            self.copied[-1].wait(copy_stream)
        plan = step.copies()
        if isinstance(plan, MemcpyPlan):
            plan.run(stream=copy_stream, pinned=True)
        else:
            plan.run(stream=copy_stream)
        self.copied.append(StreamEvent.recorded(copy_stream))


def _into_gpu(
    steps: list[_Step], stream: torch.cuda.Stream, copies: _CopyOrder
) -> list[StreamEvent]:
    """Enqueue the copy engine into the slots and the kernel out of them, step by step; returns
    an event per group, recorded after its last kernel.

    Step ``i`` goes through slot ``i % 2``: its copies wait for the kernel of the last step
    that used that slot's memory (see :func:`_behind`) to have placed its blocks, and are
    enqueued right after that kernel, so that the copy engine never waits for the host's
    planning of a later kernel. The first copies are enqueued before any kernel is planned.
    """
    placed: list[StreamEvent] = []
    done: list[StreamEvent] = []

    def copy_what_can_go() -> None:
        """Enqueue the copies of the next steps whose slots' kernels are enqueued."""
        while len(copies.copied) < len(steps):
            i = len(copies.copied)
            before = i - _behind(steps, i)
            if before >= len(placed):
                return
            copies.run(steps[i], placed[before] if before >= 0 else None)

    copy_what_can_go()
    for i, step in enumerate(steps):
        copies.copied[i].wait(stream)
        with torch.cuda.stream(stream):
            step.kernel().run()
        placed.append(StreamEvent.recorded(stream))
        if i + 1 == len(steps) or steps[i + 1].group is not step.group:
            done.append(placed[-1])
        copy_what_can_go()
    return done


def _out_of_gpu(
    steps: list[_Step], stream: torch.cuda.Stream, copies: _CopyOrder
) -> list[StreamEvent]:
    """Enqueue the kernel into the slots and the copy engine out of them, step by step;
    returns an event per group, recorded after its last copies.

    Step ``i``'s kernel waits for the copies of the last step that used its slot (see
    :func:`_behind`) to have taken that slot's blocks out.
    """
    done: list[StreamEvent] = []
    for i, step in enumerate(steps):
        before = i - _behind(steps, i)
        if before >= 0:
            copies.copied[before].wait(stream)
        with torch.cuda.stream(stream):
            step.kernel().run()
        copies.run(step, StreamEvent.recorded(stream))
        if i + 1 == len(steps) or steps[i + 1].group is not step.group:
            done.append(copies.copied[-1])
    return done


def _kernel(src: Side, dst: Side, layers: range, device: torch.device) -> CopyPlan | PermutePlan:
    """The kernel between a slot and the device layout (either way round): ``gpu_plan``'s
    when every layer moves, else the permute kernel (the formats may also be the same), whose
    operand for the slot holds the moved layers only."""
    slot_is_src = src.config.num_layers < dst.config.num_layers
    full = dst if slot_is_src else src
    if len(layers) == full.config.num_layers:
        return gpu_plan(src, dst, layers, device)
    s, d, aligned = permute_tables(src, dst, layers, device)
    src_op, dst_op = src.operand(), dst.operand()
    if slot_is_src:
        src_op = Operand(src.fmt, moved_layers_only=True)
    else:
        dst_op = Operand(dst.fmt, moved_layers_only=True)
    dims = dims_of(full.config)
    return PermutePlan.of_checked_tables(src_op, s, dst_op, d, dims, device, aligned, None, layers)


class _Copies:
    """The copy engine's copies of layers ``layers`` between pinned blocks (``pinned_at``:
    where each of ``pinned``'s blocks starts) and slot blocks, both layouts fully contiguous;
    :meth:`part` gives those of one piece. Whole blocks when every layer moves, else the
    moved layers' stretch of each row of a block.

    The runs of blocks that follow one another on both sides within a piece go as one copy;
    they are found once for the whole transfer."""

    def __init__(
        self,
        pinned: Side,
        pinned_at: list[int],
        slot: Side,
        layers: range,
        per_piece: int,
        into_gpu: bool,
    ) -> None:
        self._into_gpu = into_gpu
        self._cuda = torch.cuda.is_available()
        config = pinned.config
        self._every = len(layers) == config.num_layers
        slot_at = _block_addresses(slot)
        if self._every:
            self._width = config.block_bytes
            pinned_step = slot_step = self._width
        else:
            rows, run = _layer_rows(config, pinned.fmt)
            self._rows, self._width = rows, len(layers) * run
            self._pinned_pitch = config.num_layers * run
            pinned_at = [at + layers.start * run for at in pinned_at]  # the moved layers' start
            pinned_step, slot_step = rows * self._pinned_pitch, rows * self._width
        n = len(pinned_at)
        starts = [0] + [
            i
            for i in range(1, n)
            if i % per_piece == 0  # pieces go apart
            or pinned_at[i] - pinned_at[i - 1] != pinned_step
            or slot_at[i] - slot_at[i - 1] != slot_step
        ]
        self._starts = starts
        self._blocks = [end - first for first, end in zip(starts, starts[1:] + [n], strict=True)]
        self._pinned = [pinned_at[i] for i in starts]
        self._slot = [slot_at[i] for i in starts]

    def count(self, first: int, end: int) -> int:
        """How many copies the piece of blocks ``[first, end)`` makes."""
        runs = self._runs(first, end)
        return runs.stop - runs.start

    def part(self, first: int, end: int) -> MemcpyPlan | PitchedCopyPlan:
        """The copies of the piece of blocks ``[first, end)`` of the transfer."""
        runs = self._runs(first, end)
        pinned, slot = self._pinned[runs], self._slot[runs]
        src, dst = (pinned, slot) if self._into_gpu else (slot, pinned)
        if self._every:
            sizes = [n * self._width for n in self._blocks[runs]]
            return MemcpyPlan(src, dst, sizes, self._cuda)
        pitches = (self._pinned_pitch, self._width)
        src_pitch, dst_pitch = pitches if self._into_gpu else pitches[::-1]
        heights = [n * self._rows for n in self._blocks[runs]]
        return PitchedCopyPlan(src, dst, heights, self._width, src_pitch, dst_pitch, self._cuda)

    def _runs(self, first: int, end: int) -> slice:
        """Which runs the piece of blocks ``[first, end)`` holds (pieces go apart: a run never
        crosses from one into the next)."""
        return slice(bisect.bisect_left(self._starts, first), bisect.bisect_left(self._starts, end))


def _layer_rows(config: LayoutConfig, fmt: KvBlockLayout) -> tuple[int, int]:
    """``(rows, run)``: a block of ``config`` in ``fmt`` is ``rows`` rows one after another,
    each of ``num_layers`` runs of ``run`` bytes, one per layer in order (the dims before the
    layer dim count the rows, those after it make a run)."""
    dims = dims_of(config)
    order = fmt.dim_order
    at = order.index(BlockDim.LAYER)
    rows = math.prod(dims.size(d) for d in order[:at])
    run = math.prod(dims.size(d) for d in order[at + 1 :]) * dims.hd * config.dtype_width_bytes
    return rows, run


def _block_addresses(side: Side) -> list[int]:
    """Where each of ``side``'s blocks starts (its layout is fully contiguous)."""
    layout = side.physical.layout
    base, stride = layout.memory[0].addr, layout.block_stride
    return [base + i * stride for i in side.ids.tolist()]


def _reordered(ids: torch.Tensor, order: list[int]) -> torch.Tensor:
    """``ids[order]``, built without a torch op (see the module docstring)."""
    values = ids.tolist()
    return host_ids([values[i] for i in order])


def _part(step: CopyPlan | PermutePlan, first: int, end: int) -> CopyPlan | PermutePlan:
    """``step`` restricted to blocks ``[first, end)`` of the transfer."""
    if isinstance(step, CopyPlan):
        return replace(step, src=_rows(step.src, first, end), dst=_rows(step.dst, first, end))
    return PermutePlan.of_checked_tables(
        step.src,
        _rows(step.src_table, first, end),
        step.dst,
        _rows(step.dst_table, first, end),
        step.dims,
        step.device,
        step.aligned,
        step.programs,
        step.layers,
    )


def _rows(table: StridedTable, first: int, end: int) -> StridedTable:
    """The entries of blocks ``[first, end)`` of a block-major table."""
    return StridedTable(table.ids[first:end], table.bases, table.stride)
