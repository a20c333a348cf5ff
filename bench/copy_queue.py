"""How many copies a CUDA stream takes before the host blocks on it: ``--copies`` scattered
``cudaMemcpy2DAsync`` (``--rows`` rows of ``--width`` KiB out of 2 MiB pinned blocks, as a
layer group of a G2 block) enqueued round 1, 2 and 4 streams, one after another.

Per case, medians of ``--repeats`` runs: ``host_ms`` (enqueueing them all), ``gpu_ms`` (until
the last one ends), ``stalled_ms`` (the calls that held the host longer than ``--stall-us``,
together: the host waiting for the GPU to take a full queue) and ``stalled_from`` (the first
such call; empty when none was). A staged transfer spreads its copies over a set of
streams (``kvblocks.transfer.pools.COPY_STREAMS``) for what this shows.

Usage: python bench/copy_queue.py [--copies 3072] [--rows 8] [--width 64] > copy_queue.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time

import torch

from kvblocks.benchmarks.timing import gpu_name

#: Bytes of one pinned block (Llama-3.1-8B, 16 tokens per block).
BLOCK_BYTES = 2 << 20


def enqueue(args: argparse.Namespace, host: torch.Tensor, dev: torch.Tensor, streams: int):
    """Enqueue the copies once; returns (host seconds, GPU seconds, seconds of stalled calls,
    the first stalled call or None)."""
    from cuda.bindings import runtime as rt

    width = args.width << 10
    pitch = BLOCK_BYTES // args.rows
    slots = dev.numel() // (args.rows * width)
    pool = [torch.cuda.Stream() for _ in range(streams)]
    blocks = torch.randperm(host.numel() // BLOCK_BYTES)[: args.copies].tolist()
    kind = rt.cudaMemcpyKind.cudaMemcpyDefault
    for stream in pool:  # a stream's first copy costs the host more than the rest
        rt.cudaMemcpy2DAsync(
            dev.data_ptr(), width, host.data_ptr(), pitch, width, 1, kind, stream.cuda_stream
        )
    torch.cuda.synchronize()
    held = []
    start = time.perf_counter()
    for i, block in enumerate(blocks):
        src = host.data_ptr() + block * BLOCK_BYTES
        dst = dev.data_ptr() + i % slots * args.rows * width
        t = time.perf_counter()
        (err,) = rt.cudaMemcpy2DAsync(
            dst, width, src, pitch, width, args.rows, kind, pool[i % streams].cuda_stream
        )
        held.append(time.perf_counter() - t)
        if err != rt.cudaError_t.cudaSuccess:
            raise SystemExit(f"cudaMemcpy2DAsync failed: {err.name}")
    host_s = time.perf_counter() - start
    torch.cuda.synchronize()
    gpu_s = time.perf_counter() - start
    stalled = [i for i, s in enumerate(held) if s * 1e6 > args.stall_us]
    return host_s, gpu_s, sum(held[i] for i in stalled), stalled[0] if stalled else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=3072)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--width", type=int, default=64, help="KiB per row")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stall-us", type=float, default=50.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/copy_queue.py needs a CUDA GPU")
    if args.rows * (args.width << 10) > BLOCK_BYTES:
        raise SystemExit("--rows x --width must fit in a 2 MiB block")
    host_blocks = args.copies * 4 // 3 + 1  # the copies' blocks are a random three quarters
    host = torch.empty(host_blocks * BLOCK_BYTES, dtype=torch.uint8, pin_memory=True)
    slot_bytes = min(args.copies, 1024) * args.rows * (args.width << 10)
    dev = torch.empty(slot_bytes, dtype=torch.uint8, device="cuda")
    writer = csv.writer(sys.stdout)
    columns = ["gpu", "copies", "rows", "width_kib", "streams", "host_ms", "gpu_ms"]
    writer.writerow([*columns, "stalled_ms", "stalled_from"])
    enqueue(args, host, dev, 1)  # warm-up
    for streams in (1, 2, 4):
        runs = [enqueue(args, host, dev, streams) for _ in range(args.repeats)]
        firsts = [first for *_, first in runs if first is not None]
        writer.writerow(
            [
                gpu_name(),
                args.copies,
                args.rows,
                args.width,
                streams,
                *(round(statistics.median(r[k] for r in runs) * 1e3, 2) for k in range(3)),
                statistics.median_low(firsts) if len(firsts) * 2 > len(runs) else "",
            ]
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
