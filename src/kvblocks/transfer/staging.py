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
streams with GPU-side waits; the host never waits.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kvblocks.errors import LayoutFormatError
from kvblocks.kernels import CopyPlan, PermutePlan
from kvblocks.kernels.addresses import StridedTable
from kvblocks.kernels.memcpy import MemcpyPlan, merge_runs
from kvblocks.layout import FullyContiguousLayout, KvBlockLayout, LayoutConfig
from kvblocks.storage import MemoryAllocation, PhysicalLayout, StorageKind
from kvblocks.transfer.executor import Side, gpu_plan

#: Bytes of blocks in one slot, at most (a slot holds one block at least).
PIECE_BYTES = 64 << 20


def blocks_per_piece(side: Side) -> int:
    """Blocks of ``side`` moved per piece: as many as fit in ``PIECE_BYTES``, at least one,
    at most all of them."""
    return max(1, min(side.ids.numel(), PIECE_BYTES // side.config.block_bytes))


def slot_config(side: Side) -> LayoutConfig:
    """The blocks of the slots that the staged transfer of ``side``'s blocks goes through: two
    slots of :func:`blocks_per_piece` blocks, or one when a single piece holds every block."""
    per_piece = blocks_per_piece(side)
    slots = 1 if per_piece == side.ids.numel() else 2
    return replace(side.config, num_blocks=slots * per_piece)


def slot_layout(config: LayoutConfig, fmt: KvBlockLayout, buffer: torch.Tensor) -> PhysicalLayout:
    """The slots of ``config`` (from :func:`slot_config`), fully contiguous at the start of
    ``buffer`` (``uint8`` device memory of at least ``config.total_bytes``), in ``fmt``."""
    allocation = MemoryAllocation(StorageKind.DEVICE, buffer[: config.total_bytes], owned=False)
    layout = FullyContiguousLayout(config, allocation.region, fmt)
    return PhysicalLayout(layout, StorageKind.DEVICE, (allocation,))


def run_staged(
    src: Side,
    dst: Side,
    slots: PhysicalLayout,
    stream: torch.cuda.Stream | None,
    copy_stream: torch.cuda.Stream | None,
) -> None:
    """Move every layer of blocks ``src.ids`` into ``dst.ids`` through ``slots``.

    One side is device memory and the other pinned memory, fully contiguous (the copy engine
    moves whole blocks); the slots hold blocks in the pinned side's format, so that the copy
    engine moves them unchanged. The caller has checked the block ids (in range, no
    destination twice).

    Args:
        slots: the :func:`slot_layout` of :func:`slot_config` of ``src``, not used by anything
            else until the transfer is done.
        stream: the stream the kernels run on and the transfer is ordered on, before and
            after: it must already follow the work the transfer waits for, and work queued on
            it later sees the transfer done. ``None`` on a machine without a GPU, where every
            step runs at once, in order.
        copy_stream: a second stream, for the copy engine's steps (``None`` without a GPU).

    Raises:
        LayoutFormatError: the pinned side is not fully contiguous; nothing was moved.
    """
    into_gpu = dst.physical.storage is StorageKind.DEVICE
    pinned, name = (src, "src") if into_gpu else (dst, "dst")
    if not pinned.physical.layout.is_fully_contiguous:  # the copy engine moves whole blocks
        raise LayoutFormatError(
            name, f"must be fully contiguous to be staged, got {pinned.physical.layout.kind.label}"
        )
    n, per_piece = src.ids.numel(), blocks_per_piece(src)
    # Block i of the transfer goes through block (i % per_piece) of slot (i // per_piece) % 2.
    index = torch.arange(n)
    slot = Side(slots, (index // per_piece % 2) * per_piece + index % per_piece, slots.kv_format)
    pieces = [(first, min(first + per_piece, n)) for first in range(0, n, per_piece)]
    copies = _Copies(*((src, slot) if into_gpu else (slot, dst)))
    if stream is None:
        ends = (slot, dst) if into_gpu else (src, slot)
        kernel = gpu_plan(*ends, _every_layer(src), slot.physical.device)
        for first, end in pieces:
            steps = (copies, kernel) if into_gpu else (kernel, copies)
            for step in steps:
                _part(step, first, end).run()
        return
    copy_stream.wait_stream(stream)
    if into_gpu:
        _into_gpu(pieces, copies, slot, dst, stream, copy_stream)
    else:
        _out_of_gpu(pieces, copies, src, slot, stream, copy_stream)
    stream.wait_stream(copy_stream)


def _into_gpu(
    pieces: list[tuple[int, int]],
    copies: _Copies,
    slot: Side,
    dst: Side,
    stream: torch.cuda.Stream,
    copy_stream: torch.cuda.Stream,
) -> None:
    """Enqueue the copy engine into the slots and the kernel out of them, piece by piece.

    The copy engine starts on the first two pieces (one per slot) before the kernel is
    planned, so that the host's planning overlaps the first copies instead of delaying them.
    """
    copy_done = [torch.cuda.Event() for _ in range(2)]
    kernel_done = [torch.cuda.Event() for _ in range(2)]
    for i, (first, end) in enumerate(pieces[:2]):
        copies.part(first, end).run(batched=True, stream=copy_stream)
        copy_done[i].record(copy_stream)
    kernel = gpu_plan(slot, dst, _every_layer(dst), slot.physical.device)
    for i, (first, end) in enumerate(pieces):
        s = i % 2
        stream.wait_event(copy_done[s])
        with torch.cuda.stream(stream):
            _part(kernel, first, end).run()
        kernel_done[s].record(stream)
        if i + 2 < len(pieces):  # the next piece of this slot, once its blocks are placed
            copy_stream.wait_event(kernel_done[s])
            copies.part(*pieces[i + 2]).run(batched=True, stream=copy_stream)
            copy_done[s].record(copy_stream)


def _out_of_gpu(
    pieces: list[tuple[int, int]],
    copies: _Copies,
    src: Side,
    slot: Side,
    stream: torch.cuda.Stream,
    copy_stream: torch.cuda.Stream,
) -> None:
    """Enqueue the kernel into the slots and the copy engine out of them, piece by piece."""
    copy_done = [torch.cuda.Event() for _ in range(2)]
    kernel_done = [torch.cuda.Event() for _ in range(2)]
    kernel = gpu_plan(src, slot, _every_layer(src), slot.physical.device)
    for i, (first, end) in enumerate(pieces):
        s = i % 2
        if i >= 2:
            stream.wait_event(copy_done[s])  # the slot's blocks are out
        with torch.cuda.stream(stream):
            _part(kernel, first, end).run()
        kernel_done[s].record(stream)
        copy_stream.wait_event(kernel_done[s])
        copies.part(first, end).run(batched=True, stream=copy_stream)
        copy_done[s].record(copy_stream)


def _every_layer(side: Side) -> range:
    return range(side.config.num_layers)


class _Copies:
    """The copy engine's copies between pinned blocks and slot blocks, whole blocks (both
    layouts are fully contiguous), addressed once; :meth:`part` gives those of some blocks."""

    def __init__(self, src: Side, dst: Side) -> None:
        self._src, self._dst = _block_addresses(src), _block_addresses(dst)
        self._size = src.config.block_bytes
        self._cuda = torch.cuda.is_available()

    def part(self, first: int, end: int) -> MemcpyPlan:
        """The copies of blocks ``[first, end)`` of the transfer, each run of blocks that
        follow one another on both sides as one copy."""
        sizes = [self._size] * (end - first)
        pairs = merge_runs(self._src[first:end], self._dst[first:end], sizes)
        return MemcpyPlan(*pairs, self._cuda)


def _block_addresses(side: Side) -> list[int]:
    """Where each of ``side``'s blocks starts (its layout is fully contiguous)."""
    layout = side.physical.layout
    base, stride = layout.memory[0].addr, layout.block_stride
    return [base + b * stride for b in side.ids.tolist()]


def _part(step: _Copies | CopyPlan | PermutePlan, first: int, end: int):
    """``step`` restricted to blocks ``[first, end)`` of the transfer."""
    if isinstance(step, _Copies):
        return step.part(first, end)
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
