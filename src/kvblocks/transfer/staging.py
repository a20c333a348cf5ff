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

from kvblocks.kernels import CopyPlan, PermutePlan
from kvblocks.kernels.addresses import StridedTable
from kvblocks.kernels.memcpy import MemcpyPlan
from kvblocks.layout import FullyContiguousLayout, KvBlockLayout
from kvblocks.storage import MemoryAllocation, PhysicalLayout, StorageKind
from kvblocks.transfer.executor import Side, copy_pairs, gpu_plan

#: Bytes of blocks in one slot, at most (a slot holds one block at least).
PIECE_BYTES = 64 << 20


def blocks_per_piece(side: Side) -> int:
    """Blocks of ``side`` moved per piece: as many as fit in ``PIECE_BYTES``, at least one,
    at most all of them."""
    return max(1, min(side.ids.numel(), PIECE_BYTES // side.config.block_bytes))


def staging_bytes(side: Side) -> int:
    """Bytes of device memory the staged transfer of ``side``'s blocks needs: two slots, or
    one when a single piece holds every block."""
    per_piece = blocks_per_piece(side)
    slots = 1 if per_piece == side.ids.numel() else 2
    return slots * per_piece * side.config.block_bytes


def run_staged(
    src: Side,
    dst: Side,
    slot_fmt: KvBlockLayout,
    buffer: torch.Tensor,
    stream: torch.cuda.Stream | None,
    copy_stream: torch.cuda.Stream | None,
) -> None:
    """Move every layer of blocks ``src.ids`` into ``dst.ids`` through slots in ``buffer``.

    One side is device memory and the other pinned memory; the slots hold blocks as
    ``slot_fmt`` (the pinned side's format, so that the copy engine moves them unchanged).
    The caller has checked the block ids (in range, no destination twice).

    Args:
        buffer: ``uint8`` device memory of at least :func:`staging_bytes` bytes (of either
            side), not used by anything else until the transfer is done.
        stream: the stream the kernels run on and the transfer is ordered on, before and
            after: it must already follow the work the transfer waits for, and work queued on
            it later sees the transfer done. ``None`` on a machine without a GPU, where every
            step runs at once, in order.
        copy_stream: a second stream, for the copy engine's steps (``None`` without a GPU).
    """
    into_gpu = dst.physical.storage is StorageKind.DEVICE
    n, per_piece = src.ids.numel(), blocks_per_piece(src)
    slots = _slot_layout(src, slot_fmt, buffer, staging_bytes(src) // src.config.block_bytes)
    # Block i of the transfer goes through block (i % per_piece) of slot (i // per_piece) % 2.
    index = torch.arange(n)
    slot = Side(slots, (index // per_piece % 2) * per_piece + index % per_piece, slot_fmt)
    every_layer = range(src.config.num_layers)
    device = (dst if into_gpu else src).physical.device
    copies = _Copies(*((src, slot) if into_gpu else (slot, dst)))
    kernel = gpu_plan(*((slot, dst) if into_gpu else (src, slot)), every_layer, device)
    cuda = stream is not None
    kernel_done = [torch.cuda.Event() for _ in range(2)] if cuda else []
    copy_done = [torch.cuda.Event() for _ in range(2)] if cuda else []
    if cuda:
        copy_stream.wait_stream(stream)
    for piece, first in enumerate(range(0, n, per_piece)):
        s, end = piece % 2, min(first + per_piece, n)
        if not cuda:
            steps = (copies, kernel) if into_gpu else (kernel, copies)
            for step in steps:
                _part(step, first, end).run()
            continue
        if into_gpu:
            if piece >= 2:
                copy_stream.wait_event(kernel_done[s])  # the slot's blocks are placed
            copies.part(first, end).run(batched=True, stream=copy_stream)
            copy_done[s].record(copy_stream)
            stream.wait_event(copy_done[s])
            with torch.cuda.stream(stream):
                _part(kernel, first, end).run()
            kernel_done[s].record(stream)
        else:
            if piece >= 2:
                stream.wait_event(copy_done[s])  # the slot's blocks are out
            with torch.cuda.stream(stream):
                _part(kernel, first, end).run()
            kernel_done[s].record(stream)
            copy_stream.wait_event(kernel_done[s])
            copies.part(first, end).run(batched=True, stream=copy_stream)
            copy_done[s].record(copy_stream)
    if cuda:
        stream.wait_stream(copy_stream)


class _Copies:
    """The copy engine's pairs between pinned blocks and slot blocks, for every block of the
    transfer, planned once; :meth:`part` gives those of some blocks."""

    def __init__(self, src: Side, dst: Side) -> None:
        s, d, size, _ = copy_pairs(src, dst, range(src.config.num_layers))
        self._src, self._dst = s.expand().tolist(), d.expand().tolist()
        self._size = size
        self._per_block = s.per_block
        self._cuda = torch.cuda.is_available()

    def part(self, first: int, end: int) -> MemcpyPlan:
        """The pairs of blocks ``[first, end)`` of the transfer."""
        a, b = first * self._per_block, end * self._per_block
        return MemcpyPlan(self._src[a:b], self._dst[a:b], [self._size] * (b - a), self._cuda)


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
    )


def _rows(table: StridedTable, first: int, end: int) -> StridedTable:
    """The entries of blocks ``[first, end)`` of a block-major table."""
    return StridedTable(table.ids[first:end], table.bases, table.stride)


def _slot_layout(
    like: Side, fmt: KvBlockLayout, buffer: torch.Tensor, num_blocks: int
) -> PhysicalLayout:
    """``num_blocks`` blocks shaped like ``like``'s, fully contiguous in ``buffer``, in
    ``fmt``."""
    config = replace(like.config, num_blocks=num_blocks)
    allocation = MemoryAllocation(StorageKind.DEVICE, buffer[: config.total_bytes], owned=False)
    layout = FullyContiguousLayout(config, allocation.region, fmt)
    return PhysicalLayout(layout, StorageKind.DEVICE, (allocation,))
