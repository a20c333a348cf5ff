"""Sweep the launch shapes of the permute, copy and paged kernels on representative cases.

Prints one CSV row per (kernel, case, shape) with its median bandwidth; the best shapes are
what the modules' TILE_BYTES / CHUNK_BYTES / NUM_WARPS constants are set to.
Usage: python bench/tune.py > tune.csv   (needs a CUDA GPU)
"""

import itertools
import sys

import torch

from kvblocks.benchmarks.kvbench import _pairs, _Side
from kvblocks.benchmarks.permute import _Places
from kvblocks.benchmarks.timing import gbps, gpu_name, median_ms
from kvblocks.kernels import Operand, copy_blocks, plan_copy, plan_permute
from kvblocks.kernels import copy as kcopy
from kvblocks.kernels import paged as kpaged
from kvblocks.kernels import permutes as kperm
from kvblocks.layout import InnerOrder
from kvblocks.models import lookup_model

N, H = InnerOrder.NHD, InnerOrder.HND
SHAPES = list(itertools.product([4096, 8192, 16384, 32768], [4, 8]))
LLAMA = lookup_model("llama-3.1-70b")


def out(*fields):
    print(",".join(str(f) for f in fields), flush=True)


def tune_permute():
    cases = [
        ("universal_from_block/NHD", Operand.block_stack(N), Operand.universal()),
        ("block_from_universal/NHD", Operand.universal(), Operand.block_stack(N)),
        ("operational_from_block/NHD->HND", Operand.block_stack(N), Operand.operational(H)),
        ("universal_from_operational/HND", Operand.operational(H), Operand.universal()),
    ]
    for nt, nh in ((16, 8), (64, 32)):
        places = _Places(LLAMA.dims(nt).with_heads(nh), 128)
        moved = 2 * 128 * places.dims.block_bytes
        copy_bw = gbps(moved, median_ms(lambda p=places: p.universal.copy_(p.operational))[0])
        out("permute", f"copy nt={nt} nh={nh}", "-", "-", round(copy_bw, 1))
        for name, src, dst in cases:
            for tile, warps in SHAPES:
                kperm.TILE_BYTES, kperm.NUM_WARPS = tile, warps  # read when a plan is made
                kperm._constants.cache_clear()
                plan = plan_permute(places.table(src), src, places.table(dst), dst, places.dims)
                bw = gbps(moved, median_ms(plan.run, warmup=3, iters=20)[0])
                out("permute", f"{name} nt={nt} nh={nh}", tile, warps, round(bw, 1))
        del places
        torch.cuda.empty_cache()


def tune_copy():
    for nt in (16,):
        dims = LLAMA.dims(nt)
        host, dev = _Side(dims, 128, "pinned"), _Side(dims, 128, "device")
        dev2 = _Side(dims, 128, "device")
        cases = [
            ("h2d", "lw_to_fc", host, dev, 128),
            ("h2d", "lw_to_fc", host, dev, 1),
            ("d2h", "fc_to_lw", dev, host, 128),
            ("h2d", "fc_to_fc", host, dev, 1),
            ("d2h", "fc_to_fc", dev, host, 1),
            ("d2d", "lw_to_fc", dev, dev2, 128),
            ("d2d", "fc_to_fc", dev, dev2, 128),
        ]
        for direction, pattern, src, dst, nb in cases:
            s, d, size = _pairs(pattern, src, dst, list(range(nb)))
            plan = plan_copy(s, d, size)
            nbytes = nb * dims.block_bytes
            for chunk, warps in SHAPES + [(65536, 8), (65536, 16)]:
                kcopy.CHUNK_BYTES, kcopy.NUM_WARPS = chunk, warps
                bw = gbps(nbytes, median_ms(plan.run, warmup=3, iters=20)[0])
                out("copy", f"{direction} {pattern} N={nb} nt={nt}", chunk, warps, round(bw, 1))


def tune_paged():
    dims = LLAMA.dims(16)
    shape = (2048, dims.nt, dims.nh, dims.hd)
    keys = [torch.empty(shape, dtype=dims.dtype, device="cuda").normal_() for _ in range(dims.nl)]
    values = [torch.empty_like(k).normal_() for k in keys]
    ids = torch.randperm(2048)
    mapping = torch.stack([ids[:1024], ids[1024:]], 1).cuda()
    moved = 2 * 1024 * 2 * dims.nl * dims.nt * dims.nh * dims.hd * dims.itemsize
    for tile, warps in SHAPES:
        kpaged.TILE_BYTES, kpaged.NUM_WARPS = tile, warps
        bw = gbps(
            moved, median_ms(lambda: copy_blocks(keys, values, mapping), warmup=3, iters=20)[0]
        )
        out("paged", "copy_blocks 1024 pairs", tile, warps, round(bw, 1))


if __name__ == "__main__":
    print(f"# {gpu_name()}", file=sys.stderr)
    out("kernel", "case", "tile_bytes", "num_warps", "gbps")
    which = sys.argv[1:] or ["permute", "copy", "paged"]
    for name in which:
        globals()[f"tune_{name}"]()
