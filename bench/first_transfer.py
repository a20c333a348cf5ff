"""How long a process's first transfer of each size takes, against the same transfer again.

Triton compiles a kernel for each new combination of the integer arguments it specializes on
(a value of 1, a multiple of 16), so a transfer of a block count not seen before can pay a
compile on the engine's critical path. This script starts from an empty Triton cache and moves
1, 2, 3, ... blocks between an engine-style layer-separate GPU cache and fully contiguous pinned
blocks (the same format: the copy kernel; Universal TP: the permute kernel), in both
directions, in one process; ``first_ms`` is the first call of a size, ``again_ms`` the median of
five more. Block counts from ``staged_min_bytes`` up take the staged route.

Usage: python bench/first_transfer.py   (needs a CUDA GPU; CSV on stdout)
"""

import os
import statistics
import sys
import tempfile
import time

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kvblocks-triton-")

import torch  # noqa: E402

from kvblocks.layout import KvBlockLayout, KvDims, LayoutConfig  # noqa: E402
from kvblocks.storage import PhysicalLayout  # noqa: E402
from kvblocks.transfer import TransferManager, TransferOptions  # noqa: E402

#: Qwen2.5-7B's KV block at 16 tokens (28 layers: 56 regions, not a multiple of 16).
DIMS = KvDims(nl=28, no=2, nh=4, nt=16, hd=128)
NHD = KvBlockLayout.OperationalNHD
COUNTS = (1, 2, 3, 4, 5, 7, 8, 12, 16, 17, 31, 32, 33, 64, 100, 128, 129, 250, 256)


def wall_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("first_transfer: needs a CUDA GPU")
    config = LayoutConfig.from_dims(DIMS, max(COUNTS))
    gpu_name = torch.cuda.get_device_name()
    print("gpu,host_format,direction,blocks,strategy,first_ms,again_ms")
    with TransferManager.builder().cuda_device_id(0).build() as manager:
        gpu = manager.register_layout(
            PhysicalLayout.builder(config)
            .kv_format(NHD)
            .layer_separate()
            .allocate_device(0)
            .build()
        )
        host = manager.register_layout(
            PhysicalLayout.builder(config)
            .kv_format(NHD)
            .fully_contiguous()
            .allocate_pinned()
            .build()
        )
        for host_format in (None, KvBlockLayout.UniversalTP):
            options = TransferOptions(dst_kv_layout=host_format)
            back = TransferOptions(src_kv_layout=host_format)
            for n in COUNTS:
                ids = list(range(n))
                for direction, src, dst, opts in (
                    ("d2h", gpu, host, options),
                    ("h2d", host, gpu, back),
                ):

                    def move(s=src, d=dst, o=opts, i=ids):
                        manager.execute_transfer(s, i, d, i, o).wait()

                    strategy = manager.strategy(src, dst, opts, n).value
                    first = wall_ms(move)
                    again = statistics.median(wall_ms(move) for _ in range(5))
                    fmt = "same" if host_format is None else host_format.name
                    row = (gpu_name, fmt, direction, n, strategy, f"{first:.2f}", f"{again:.2f}")
                    print(",".join(map(str, row)), flush=True)


if __name__ == "__main__":
    main()
