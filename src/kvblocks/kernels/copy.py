"""vectorized_copy: copy ``size`` bytes for each of ``num_pairs`` (source, destination) pairs.

One launch moves every pair. A pair is split into chunks of ``CHUNK_BYTES`` so that a single
large pair still spreads over the whole GPU. Accesses are as wide as the pointers' common
alignment and the size allow: 16, 8 or 4 bytes (32-bit words, vectorized), 2 bytes or 1 byte.
Pointers may be device memory or pinned host memory (zero copy: the kernel itself crosses PCIe).

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

#: Bytes one program copies; tuned on the H100 by bench/tune.py.
CHUNK_BYTES = 16384
NUM_WARPS = 8


@triton.jit
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
    WORD: tl.constexpr,
    ALIGN: tl.constexpr,
    CHUNK: tl.constexpr,
    EVEN: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
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


def copy_reference(src: list[torch.Tensor], dst: list[torch.Tensor]) -> None:
    """What :func:`vectorized_copy` computes: ``dst[i][:] = src[i]`` for every pair."""
    for s, d in zip(src, dst, strict=True):
        d.copy_(s)


@dataclass(frozen=True)
class CopyPlan:
    """A validated batch of same-size copies, ready to run any number of times.

    ``src`` and ``dst`` hold ``num_pairs`` addresses each, on ``device`` for the Triton
    backends; ``align`` divides every address and ``size``.
    """

    src: StridedTable
    dst: StridedTable
    size: int
    align: int
    device: torch.device
    backend: Backend

    @property
    def num_pairs(self) -> int:
        return len(self.src)

    def _spans(self, table: StridedTable) -> list[torch.Tensor]:
        return [tensor_at(a, self.size, torch.uint8, self.device) for a in table.expand().tolist()]

    def run(self) -> None:
        if self.num_pairs == 0:
            return
        if self.backend is Backend.REFERENCE:
            copy_reference(self._spans(self.src), self._spans(self.dst))
            return
        word_bytes = min(self.align, 4)
        word = {1: tl.int8, 2: tl.int16, 4: tl.int32}[word_bytes]
        words = self.size // word_bytes
        chunk = max(1, min(CHUNK_BYTES // word_bytes, 1 << (words - 1).bit_length()))
        chunks_per_pair = triton.cdiv(words, chunk)
        with LAUNCH_LOCK:
            _copy_kernel[(self.num_pairs * chunks_per_pair,)](
                *self.src.kernel_args(),
                *self.dst.kernel_args(),
                words,
                chunks_per_pair,
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
) -> CopyPlan:
    """Check a batch of copies and prepare it.

    Args:
        src_ptrs: ``num_pairs`` source addresses.
        dst_ptrs: ``num_pairs`` destination addresses; written by runs.
        size: bytes per pair, > 0.
        device: where the kernel runs (default: the current GPU, else the CPU).
        check_overlap: False skips the overlap check, for callers that know the destinations
            overlap neither each other nor the sources.

    Raises:
        LengthMismatchError: the two tables differ in length.
        OverlapError: two destinations overlap, or a destination overlaps a source.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidArgumentError("size", f"must be a positive int of bytes, got {size!r}")
    src = host_table(src_ptrs, "src_ptrs")
    dst = host_table(dst_ptrs, "dst_ptrs", length=src.numel())
    if check_overlap:
        check_disjoint(src, size, dst, size, "src_ptrs", "dst_ptrs")
    device = torch.device(device) if device is not None else default_device()
    backend = available(device)
    align = common_alignment(src, dst, size)
    if backend is Backend.TRITON:
        src, dst = src.to(device), dst.to(device)
    return CopyPlan(StridedTable.flat(src), StridedTable.flat(dst), size, align, device, backend)


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
