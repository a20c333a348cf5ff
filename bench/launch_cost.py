"""Host time of one copy-kernel launch, by how it is launched.

One block of Llama-3.1-70B at 16 tokens per block, h2d layer-wise (160 pairs of 32 KiB from
pinned memory), launched four ways, each timed on the host alone (``time.perf_counter`` around
the call; the GPU is waited for every 20 calls, outside the timing), median of the last 350 of
400 calls, three rounds:

- ``plan.run``: :meth:`kvblocks.kernels.CopyPlan.run`, what a transfer calls;
- ``jit``: Triton's ``kernel[grid](*args, **constexprs)`` (binds the arguments, works out their
  specialization, looks the compiled kernel up, then launches it);
- ``compiled[grid]``: the compiled kernel's own launcher, the lookup skipped;
- ``compiled.run``: the launcher's C entry point, given the stream Triton's driver reports.

Usage on a GPU machine: ``python bench/launch_cost.py`` (one line per round on stdout).
"""

from __future__ import annotations

import statistics
import time

import torch
import triton
import triton.language as tl
from triton.runtime import driver

from kvblocks.kernels import copy as copy_kernels
from kvblocks.kernels import pinned_programs, plan_copy
from kvblocks.kernels.grid import grid_size

PAIRS, SIZE = 160, 32 * 1024


def host_us(fn, calls: int = 400, skip: int = 50) -> float:
    """Median host time of ``fn()`` in microseconds."""
    times = []
    for i in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if i % 20 == 19:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return statistics.median(times[skip:]) * 1e6


def main() -> None:
    host = torch.randint(0, 255, (PAIRS * SIZE,), dtype=torch.uint8).pin_memory()
    dev = torch.empty(PAIRS * SIZE, dtype=torch.uint8, device="cuda")
    src = torch.tensor([host.data_ptr() + i * SIZE for i in range(PAIRS)])
    dst = torch.tensor([dev.data_ptr() + i * SIZE for i in range(PAIRS)])
    plan = plan_copy(src, dst, SIZE, "cuda", programs=pinned_programs(True, False, SIZE))
    words, chunk, chunks_per_pair = copy_kernels._words_and_chunk(plan.size, plan.align)
    num_chunks = plan.num_pairs * chunks_per_pair
    grid = grid_size(num_chunks, plan.programs)
    args = (*plan.src.kernel_args(), *plan.dst.kernel_args(), words, chunks_per_pair, num_chunks)
    constexprs = {
        "WORD": {1: tl.int8, 2: tl.int16, 4: tl.int32}[min(plan.align, 4)],
        "ALIGN": plan.align,
        "CHUNK": chunk,
        "EVEN": words % chunk == 0,
    }
    kernel = copy_kernels._copy_kernel
    compiled = kernel[(grid,)](*args, **constexprs, num_warps=copy_kernels.NUM_WARPS)
    everything = (*args, *constexprs.values())
    device = torch.cuda.current_device()

    def jit() -> None:
        kernel[(grid,)](*args, **constexprs, num_warps=copy_kernels.NUM_WARPS)

    def launcher() -> None:
        compiled[(grid, 1, 1)](*everything)

    def entry_point() -> None:
        stream = driver.active.get_current_stream(device)
        compiled.run(
            grid, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
            *everything,
        )  # fmt: skip

    for way in (jit, launcher, entry_point):  # each way moves the bytes right
        dev.fill_(0xFF)
        way()
        torch.cuda.synchronize()
        assert torch.equal(dev.cpu(), host), f"{way.__name__} moved the bytes wrongly"
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}, torch {torch.__version__}, Triton {triton.__version__}")
    for _ in range(3):
        print(
            f"plan.run {host_us(plan.run):.1f} us  jit {host_us(jit):.1f} us  "
            f"compiled[grid] {host_us(launcher):.1f} us  compiled.run {host_us(entry_point):.1f} us"
        )


if __name__ == "__main__":
    main()
