"""vectorized_copy: copy ``size`` bytes for each of ``num_pairs`` (source, destination) pairs.

One launch moves every pair. A pair is split into chunks of ``CHUNK_BYTES`` so that a single
large pair still spreads over the whole GPU. Accesses are as wide as the pointers' common
alignment and the size allow: 16, 8 or 4 bytes (32-bit words, vectorized), 2 bytes or 1 byte.
Pointers may be device memory or pinned host memory (zero copy: the kernel itself crosses PCIe;
there a few programs looping over the chunks move as much, see :mod:`kvblocks.kernels.grid`).

Reference: :func:`copy_reference`, a ``copy_`` per pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvblocks.errors import InvalidArgumentError
from kvblocks.kernels._triton import LAUNCH_LOCK, tl, triton
from kvblocks.kernels.addresses import (
    AddressTable,
    StridedTable,
    check_disjoint,
    common_alignment,
    host_table,
    table_entry,
    tensor_at,
)
from kvblocks.kernels.backend import Backend, available, default_device
from kvblocks.kernels.grid import check_programs, grid_size

#: Bytes one program copies; tuned on the H100 by bench/tune.py.
CHUNK_BYTES = 16384
NUM_WARPS = 8


# Counts that grow with the number of blocks are not specialized on (a value of 1, a multiple
# of 16), nor block id tables on their alignment (a slice of one may start at any entry), so
# that a transfer of a block count not seen before, or a piece of one, runs without a compile.
@triton.jit(
    do_not_specialize=["num_chunks"],
    do_not_specialize_on_alignment=["src_ids", "dst_ids"],
)
def _copy_kernel(
    src_ids,
    src_bases,
    src_stride,
    src_per_block,
    dst_ids,
    dst_bases,
    dst_stride,
    dst_per_block,
    words,
    chunks_per_pair,
    num_chunks,
    WORD: tl.constexpr,
    ALIGN: tl.constexpr,
    CHUNK: tl.constexpr,
    EVEN: tl.constexpr,
):
    # Program p copies chunks p, p + G, p + 2G, ... of the G programs' grid (one chunk each
    # when the grid has a program per chunk).
    for c in range(tl.program_id(0), num_chunks, tl.num_programs(0)):
        pid = tl.cast(c, tl.int64)
        pair = pid // chunks_per_pair
        chunk = pid % chunks_per_pair
        src = table_entry(src_ids, src_bases, src_stride, src_per_block, pair)
        dst = table_entry(dst_ids, dst_bases, dst_stride, dst_per_block, pair)
        src = tl.multiple_of(src.to(tl.pointer_type(WORD)), ALIGN)
        dst = tl.multiple_of(dst.to(tl.pointer_type(WORD)), ALIGN)
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        if EVEN:
            tl.store(dst + offs, tl.load(src + offs))
        else:
            mask = offs < words
            tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def _words_and_chunk(size: int, align: int) -> tuple[int, int, int]:
    """For pairs of ``size`` bytes at addresses ``align`` divides: words of ``min(align, 4)``
    bytes per pair, words per chunk, chunks per pair."""
    words = size // min(align, 4)
    chunk = max(1, min(CHUNK_BYTES // min(align, 4), 1 << (words - 1).bit_length()))
    return words, chunk, triton.cdiv(words, chunk)


def copy_step_bytes(size: int, align: int) -> int:
    """Bytes a program of the copy kernel moves at a time (a chunk), for pairs of ``size``
    bytes at addresses ``align`` divides."""
    _, chunk, _ = _words_and_chunk(size, align)
    return min(chunk * min(align, 4), size)


def copy_reference(src: list[torch.Tensor], dst: list[torch.Tensor]) -> None:
    """What :func:`vectorized_copy` computes: ``dst[i][:] = src[i]`` for every pair."""
    for s, d in zip(src, dst, strict=True):
        d.copy_(s)


@dataclass(frozen=True)
class CopyPlan:
    """A validated batch of same-size copies, ready to run any number of times.

    ``src`` and ``dst`` hold ``num_pairs`` addresses each, on ``device`` for the Triton
    backends; ``align`` divides every address and ``size``. ``programs`` caps the kernel's
    grid (each program then copies every ``programs``-th chunk); ``None``: one program per
    chunk.
    """

    src: StridedTable
    dst: StridedTable
    size: int
    align: int
    device: torch.device
    backend: Backend
    programs: int | None = None

    @property
    def num_pairs(self) -> int:
        return len(self.src)

    @property
    def num_programs(self) -> int:
        """Programs the kernel launches with (a run on the Triton backend)."""
        return grid_size(self.num_pairs * _words_and_chunk(self.size, self.align)[2], self.programs)

    @property
    def step_bytes(self) -> int:
        """Bytes a program copies at a time (a chunk)."""
        return copy_step_bytes(self.size, self.align)

    def _spans(self, table: StridedTable) -> list[torch.Tensor]:
        return [tensor_at(a, self.size, torch.uint8, self.device) for a in table.expand().tolist()]

    def run(self) -> None:
        if self.num_pairs == 0:
            return
        if self.backend is Backend.REFERENCE:
            copy_reference(self._spans(self.src), self._spans(self.dst))
            return
        word = {1: tl.int8, 2: tl.int16, 4: tl.int32}[min(self.align, 4)]
        words, chunk, chunks_per_pair = _words_and_chunk(self.size, self.align)
        num_chunks = self.num_pairs * chunks_per_pair
        with LAUNCH_LOCK:
            _copy_kernel[(grid_size(num_chunks, self.programs),)](
                *self.src.kernel_args(),
                *self.dst.kernel_args(),
                words,
                chunks_per_pair,
                num_chunks,
                WORD=word,
                ALIGN=self.align,
                CHUNK=chunk,
                EVEN=words % chunk == 0,
                num_warps=NUM_WARPS,
            )


def plan_copy(
    src_ptrs: AddressTable,
    dst_ptrs: AddressTable,
    size: int,
    device: torch.device | str | None = None,
    check_overlap: bool = True,
    programs: int | None = None,
) -> CopyPlan:
    """Check a batch of copies and prepare it.

    Args:
        src_ptrs: ``num_pairs`` source addresses.
        dst_ptrs: ``num_pairs`` destination addresses; written by runs.
        size: bytes per pair, > 0.
        device: where the kernel runs (default: the current GPU, else the CPU).
        check_overlap: False skips the overlap check, for callers that know the destinations
            overlap neither each other nor the sources.
        programs: at most this many programs copy the chunks
            (:func:`~kvblocks.kernels.pinned_programs` gives the number for copies that read
            or write pinned host memory: as fast, and the rest of the GPU stays free);
            ``None``: one program per chunk, for device memory.

    Raises:
        InvalidArgumentError: ``size`` or ``programs`` is not a positive int.
        LengthMismatchError: the two tables differ in length.
        OverlapError: two destinations overlap, or a destination overlaps a source.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidArgumentError("size", f"must be a positive int of bytes, got {size!r}")
    check_programs(programs)
    src = host_table(src_ptrs, "src_ptrs")
    dst = host_table(dst_ptrs, "dst_ptrs", length=src.numel())
    if check_overlap:
        check_disjoint(src, size, dst, size, "src_ptrs", "dst_ptrs")
    device = torch.device(device) if device is not None else default_device()
    backend = available(device)
    align = common_alignment(src, dst, size)
    if backend is Backend.TRITON:
        src, dst = src.to(device), dst.to(device)
    src, dst = StridedTable.flat(src), StridedTable.flat(dst)
    return CopyPlan(src, dst, size, align, device, backend, programs)


def vectorized_copy(
    src_ptrs: AddressTable,
    dst_ptrs: AddressTable,
    size: int,
    device: torch.device | str | None = None,
) -> None:
    """Copy ``size`` bytes from each ``src_ptrs[i]`` to ``dst_ptrs[i]`` in one launch.

    Runs on the current stream of ``device``; see :func:`plan_copy` for the checks.
    """
    plan_copy(src_ptrs, dst_ptrs, size, device).run()
