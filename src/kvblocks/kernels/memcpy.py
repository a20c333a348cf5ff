"""Batched copies through the CUDA copy engines instead of a kernel.

- :func:`memcpy_batch`: one ``cudaMemcpyBatchAsync`` call for all pairs (CUDA 12.8+), falling
  back to one ``cudaMemcpyAsync`` per pair where the batch API is missing.
- :func:`memcpy_per_pair`: always one ``cudaMemcpyAsync`` per pair.
- :func:`has_memcpy_batch_async`: whether the batch API can be used here.
- :class:`PitchedCopyPlan`: rows at a fixed pitch, one ``cudaMemcpy2DAsync`` per run of them.

Both go through cuda-bindings (extra ``gpu``). On a machine without CUDA they copy host memory
with ``memmove`` so the same code runs everywhere. Sizes may differ per pair.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvblocks.errors import BackendUnavailableError, InvalidArgumentError, KvBlocksError
from kvblocks.kernels import cuda_calls
from kvblocks.kernels.addresses import AddressTable, check_disjoint, host_table

_MIN_BATCH_VERSION = 12080  # cudaMemcpyBatchAsync appeared in CUDA 12.8
# torch's default stream is the null stream (0), which acts as the legacy default stream, as
# does the handle cudaStreamLegacy (1); cudaStreamPerThread is 2.
_LEGACY_STREAMS, _PER_THREAD_STREAM = (0, 1), 2
#: Pairs of pinned or device memory enqueued one call each with the GIL held, at most; more go
#: as one batch (a call each costs the host about a microsecond, a batch lets the GIL go once).
GIL_HELD_PAIRS = 256


def _runtime():
    try:
        from cuda.bindings import runtime
    except ImportError:
        return None
    return runtime


def has_cuda_bindings() -> bool:
    """Whether cuda-bindings, which the copy-engine paths call, is installed."""
    return _runtime() is not None


def require_cuda_bindings() -> None:
    """Raise where a GPU is present but cuda-bindings is not.

    Raises:
        BackendUnavailableError: the copy engines cannot be driven here.
    """
    if torch.cuda.is_available() and not has_cuda_bindings():
        raise BackendUnavailableError(
            "memcpy on a GPU needs cuda-bindings (pip install kvblocks[gpu])"
        )


@functools.cache
def has_memcpy_batch_async() -> bool:
    """True where a GPU, cuda-bindings and a CUDA 12.8+ driver and runtime are all present."""
    rt = _runtime()
    if rt is None or not torch.cuda.is_available() or not hasattr(rt, "cudaMemcpyBatchAsync"):
        return False
    err, driver = rt.cudaDriverGetVersion()
    err2, runtime = rt.cudaRuntimeGetVersion()
    ok = rt.cudaError_t.cudaSuccess
    return err == ok and err2 == ok and min(driver, runtime) >= _MIN_BATCH_VERSION


def _check(result, call: str) -> None:
    err = result[0] if isinstance(result, tuple) else result
    if err != _runtime().cudaError_t.cudaSuccess:
        raise KvBlocksError(f"{call} failed: {err.name}")


@dataclass(frozen=True)
class MemcpyPlan:
    """Validated copy pairs, as the Python lists the CUDA calls take."""

    src: list[int]
    dst: list[int]
    sizes: list[int]
    cuda: bool

    def run(
        self, batched: bool = True, stream: torch.cuda.Stream | None = None, pinned: bool = False
    ) -> None:
        """Enqueue the copies on ``stream`` (default: the current stream).

        Args:
            batched: use one ``cudaMemcpyBatchAsync`` where available, else one call per pair.
            pinned: every span is pinned host memory or device memory: up to
                ``GIL_HELD_PAIRS`` pairs go one call each through the driver with the GIL
                held (see :mod:`~kvblocks.kernels.cuda_calls`), whatever ``batched`` says.
        """
        if not self.src:
            return
        if not self.cuda:
            for s, d, n in zip(self.src, self.dst, self.sizes, strict=True):
                ctypes.memmove(d, s, n)
            return
        stream = stream or torch.cuda.current_stream()
        if pinned and len(self.src) <= GIL_HELD_PAIRS and cuda_calls.available():
            cuda_calls.memcpy_async(self.dst, self.src, self.sizes, stream)
            return
        rt = _runtime()
        handle = stream.cuda_stream
        if batched and has_memcpy_batch_async():
            if handle in _LEGACY_STREAMS:
                # The batch API refuses the legacy default stream. The per-thread default
                # stream synchronizes with it both ways, so stream order is kept.
                handle = _PER_THREAD_STREAM
            attrs = rt.cudaMemcpyAttributes()
            attrs.srcAccessOrder = rt.cudaMemcpySrcAccessOrder.cudaMemcpySrcAccessOrderStream
            count = len(self.src)
            _check(
                rt.cudaMemcpyBatchAsync(
                    self.dst, self.src, self.sizes, count, [attrs], [0], 1, handle
                ),
                "cudaMemcpyBatchAsync",
            )
            return
        kind = rt.cudaMemcpyKind.cudaMemcpyDefault
        for s, d, n in zip(self.src, self.dst, self.sizes, strict=True):
            _check(rt.cudaMemcpyAsync(d, s, n, kind, handle), "cudaMemcpyAsync")


@dataclass(frozen=True)
class PitchedCopyPlan:
    """Copies of rows at a fixed pitch, one ``cudaMemcpy2DAsync`` each (a single descriptor
    for the copy engine, where a batch of one copy per row would cost the host per row): copy
    ``i`` moves ``heights[i]`` rows of ``width`` bytes, row ``r`` from
    ``src[i] + r * src_pitch`` to ``dst[i] + r * dst_pitch``."""

    src: list[int]
    dst: list[int]
    heights: list[int]
    width: int
    src_pitch: int
    dst_pitch: int
    cuda: bool

    def run(self, stream: torch.cuda.Stream | None = None) -> None:
        """Enqueue the copies on ``stream`` (default: the current stream); without CUDA, copy
        host memory row by row at once."""
        if not self.cuda:
            for s, d, height in zip(self.src, self.dst, self.heights, strict=True):
                for r in range(height):
                    ctypes.memmove(d + r * self.dst_pitch, s + r * self.src_pitch, self.width)
            return
        rt = _runtime()
        handle = (stream or torch.cuda.current_stream()).cuda_stream
        kind = rt.cudaMemcpyKind.cudaMemcpyDefault
        # Each call holds the host 3 to 4 us, most of it in the driver: the loop keeps the
        # rest small (one lookup of the function, an error check without a call).
        copy, ok = rt.cudaMemcpy2DAsync, rt.cudaError_t.cudaSuccess
        width, src_pitch, dst_pitch = self.width, self.src_pitch, self.dst_pitch
        for s, d, height in zip(self.src, self.dst, self.heights, strict=True):
            (err,) = copy(d, dst_pitch, s, src_pitch, width, height, kind, handle)
            if err != ok:
                raise KvBlocksError(f"cudaMemcpy2DAsync failed: {err.name}")


def merge_runs(
    src: list[int], dst: list[int], sizes: list[int]
) -> tuple[list[int], list[int], list[int]]:
    """The same copies as fewer pairs: each run of pairs that continue one another on both
    sides (pair ``i + 1`` starts where pair ``i`` ends, in the source and in the destination)
    becomes one pair.

    Args:
        src, dst, sizes: pair ``i`` copies ``sizes[i]`` bytes from ``src[i]`` to ``dst[i]``.

    Returns:
        ``(src, dst, sizes)`` of the merged pairs, in order.
    """
    out_src: list[int] = []
    out_dst: list[int] = []
    out_sizes: list[int] = []
    for s, d, n in zip(src, dst, sizes, strict=True):
        if out_sizes and out_src[-1] + out_sizes[-1] == s and out_dst[-1] + out_sizes[-1] == d:
            out_sizes[-1] += n
        else:
            out_src.append(s)
            out_dst.append(d)
            out_sizes.append(n)
    return out_src, out_dst, out_sizes


def plan_memcpy(
    src_ptrs: AddressTable,
    dst_ptrs: AddressTable,
    sizes: int | Sequence[int],
    check_overlap: bool = True,
    merge: bool = False,
) -> MemcpyPlan:
    """Check copy pairs: equal lengths, positive sizes, no destination overlapping another
    destination or a source (``check_overlap`` False skips that check, for callers that know
    the pairs are disjoint). With ``merge``, pairs that continue one another on both sides are
    copied as one (see :func:`merge_runs`): the same bytes move in fewer, longer copies.

    Raises:
        BackendUnavailableError: a GPU is present but cuda-bindings is not installed.
    """
    src = host_table(src_ptrs, "src_ptrs")
    dst = host_table(dst_ptrs, "dst_ptrs", length=src.numel())
    if isinstance(sizes, int) and not isinstance(sizes, bool):
        size_t = torch.full_like(src, sizes)
    else:
        size_t = host_table(sizes, "sizes", length=src.numel(), addresses=False)
    if size_t.numel() and int(size_t.min()) < 1:
        raise InvalidArgumentError("sizes", "must all be positive byte counts")
    if check_overlap:
        check_disjoint(src, size_t, dst, size_t, "src_ptrs", "dst_ptrs")
    require_cuda_bindings()
    pairs = src.tolist(), dst.tolist(), size_t.tolist()
    return MemcpyPlan(*(merge_runs(*pairs) if merge else pairs), torch.cuda.is_available())


def memcpy_batch(
    src_ptrs: AddressTable,
    dst_ptrs: AddressTable,
    sizes: int | Sequence[int],
    stream: torch.cuda.Stream | None = None,
) -> None:
    """Copy ``sizes[i]`` bytes (or ``sizes`` for all) from ``src_ptrs[i]`` to ``dst_ptrs[i]``
    with one ``cudaMemcpyBatchAsync``, or one ``cudaMemcpyAsync`` per pair without it."""
    plan_memcpy(src_ptrs, dst_ptrs, sizes).run(batched=True, stream=stream)


def memcpy_per_pair(
    src_ptrs: AddressTable,
    dst_ptrs: AddressTable,
    sizes: int | Sequence[int],
    stream: torch.cuda.Stream | None = None,
) -> None:
    """Like :func:`memcpy_batch` with one ``cudaMemcpyAsync`` per pair."""
    plan_memcpy(src_ptrs, dst_ptrs, sizes).run(batched=False, stream=stream)
