"""How many programs a copy kernel on pinned memory needs: each cap's bandwidth alone and the
slowdown of engine-like work beside it.

For each grid cap (a number of programs, or ``none``: a program per 16 KiB chunk) the
TransferManager moves 1 to 128 blocks of Llama-3.1-70B (16 tokens per block) between a
layer-separate device cache and fully contiguous pinned blocks of the same format (the copy
kernel, staging off), h2d and d2h, alone and beside the contention suite's ``gemm`` and
``stream`` work (:mod:`kvblocks.benchmarks.contention`; medians of ``iters``). The table of
docs/performance.md ("Transfers while the engine computes") came from this sweep.

CSV on stdout: programs, num_blocks, direction, work, transfer_alone_gbps,
transfer_shared_gbps, work_alone_ms, work_shared_ms, work_slowdown, both_ms.
Usage: python bench/pinned_grid.py [CAPS [BLOCKS [ITERS]]]
       (default: none,132,32,16,8,4  1,4,16,128  20; needs a CUDA GPU)
"""

import sys

import torch

import kvblocks.transfer.executor as executor
from kvblocks.benchmarks import contention
from kvblocks.benchmarks.timing import require_gpu
from kvblocks.layout import KvBlockLayout, LayoutConfig
from kvblocks.models import lookup_model
from kvblocks.transfer import TransferManager, TransferPreferences


def main(argv: list[str]) -> None:
    caps = [
        None if c == "none" else int(c) for c in (argv[0:1] or ["none,132,32,16,8,4"])[0].split(",")
    ]
    blocks = [int(n) for n in (argv[1:2] or ["1,4,16,128"])[0].split(",")]
    iters = int(argv[2]) if len(argv) > 2 else 20
    device = require_gpu()
    dims = lookup_model("llama-3.1-70b").dims(16)
    works = [contention._Work(kind, device) for kind in contention.WORKS]
    streams = (torch.cuda.Stream(), torch.cuda.Stream())
    prefs = TransferPreferences(staged_min_bytes=None, copy_engine_min_bytes=None)
    print(
        "programs,num_blocks,direction,work,transfer_alone_gbps,transfer_shared_gbps,"
        "work_alone_ms,work_shared_ms,work_slowdown,both_ms"
    )
    for cap in caps:
        # Every kernel hop with a pinned side runs on ``cap`` programs.
        executor.pinned_programs = lambda reads, writes, step, c=cap: c if reads or writes else None
        with (
            TransferManager.builder()
            .cuda_device_id(device.index or 0)
            .preferences(prefs)
            .build() as m
        ):
            for nb in blocks:
                config = LayoutConfig.from_dims(dims, nb)
                for direction in ("h2d", "d2h"):
                    rows = contention._rows(
                        m,
                        config,
                        KvBlockLayout.OperationalNHD,
                        direction,
                        "kernel",
                        works,
                        streams,
                        iters,
                    )
                    for r in rows:
                        print(
                            cap or "none",
                            nb,
                            direction,
                            r.work,
                            r.transfer_alone_gbps,
                            r.transfer_shared_gbps,
                            r.work_alone_ms,
                            r.work_shared_ms,
                            r.work_slowdown,
                            r.both_ms,
                            sep=",",
                            flush=True,
                        )


if __name__ == "__main__":
    main(sys.argv[1:])
