"""copy_blocks between an engine's paged caches on the GPU and pinned host caches (swap out and
swap in of 128 blocks shaped like Llama-3.1-70B's: 80 layers, K and V, 16 tokens, 8 heads of
128, bf16), on the capped grid the plan picks for pinned memory and on a program per tile, each
against one bulk pinned copy of the same bytes; every result is checked.

Usage: python bench/paged_pinned.py   (needs a CUDA GPU)
"""

import statistics
from dataclasses import replace

import torch

from kvblocks.kernels.paged import plan_paged

LAYERS, BLOCKS = 80, 128
SHAPE = (BLOCKS, 16, 8, 128)


def median_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    device = [torch.randn(SHAPE, device="cuda").to(torch.bfloat16) for _ in range(2 * LAYERS)]
    host = [torch.empty(SHAPE, dtype=torch.bfloat16).pin_memory() for _ in range(2 * LAYERS)]
    mapping = torch.stack([torch.arange(BLOCKS), torch.arange(BLOCKS)], 1)
    nbytes = sum(c.nbytes for c in device)
    bulk_host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    bulk_device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    print("gpu,direction,grid,programs,gbps,bulk_gbps,ratio")
    for direction, src, dst in (("d2h", device, host), ("h2d", host, device)):
        plan = plan_paged(
            src[:LAYERS],
            src[LAYERS:],
            mapping,
            dst_key_caches=dst[:LAYERS],
            dst_value_caches=dst[LAYERS:],
        )
        out, into = (bulk_host, bulk_device) if direction == "h2d" else (bulk_device, bulk_host)
        for grid, run in (("capped", plan), ("per-tile", replace(plan, programs=None))):
            for d in dst:
                d.fill_(0)
            ms = median_ms(run.run)
            bulk_ms = median_ms(lambda i=into, o=out: i.copy_(o, non_blocking=True))
            for d, s in zip(dst, src, strict=True):
                assert torch.equal(d.cpu(), s.cpu()), f"{direction} {grid}: wrong bytes"
            gbps, bulk = nbytes / ms / 1e6, nbytes / bulk_ms / 1e6
            row = (torch.cuda.get_device_name(), direction, grid, run.num_programs)
            print(",".join(map(str, row)), f"{gbps:.2f},{bulk:.2f},{gbps / bulk:.3f}", sep=",")


if __name__ == "__main__":
    main()
