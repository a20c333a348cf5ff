"""copy_blocks / swap_blocks on a paged cache, against a plain device copy of the same bytes.

The cache is an engine's: per layer a key and a value tensor ``[num_blocks, nt, nh, hd]``.
``pairs`` mappings between distinct blocks are copied or swapped in every cache with one
launch, planned once (the checks of the mapping and caches are timed apart, on the host, as
``plan_us``). Peers, timed interleaved with the kernel: a plain device copy of the same
number of bytes (the ceiling) and the same work done with torch indexing, one layer and cache
at a time.
Bandwidth counts bytes read plus bytes written (a swap reads and writes both blocks).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from kvblocks.benchmarks.timing import gbps, median_ms, progress, require_gpu
from kvblocks.kernels import plan_paged
from kvblocks.kernels.paged import copy_blocks_reference, swap_blocks_reference
from kvblocks.layout import KvDims


@dataclass(frozen=True)
class PagedRow:
    op: str
    num_layers: int
    pairs: int
    block_bytes: int
    bytes_moved: int
    median_ms: float
    bandwidth_gbps: float
    plan_us: float
    torch_indexing_gbps: float
    copy_gbps: float
    ratio: float


def run(dims: KvDims, pairs: int = 1024, warmup: int = 5, iters: int = 50) -> list[PagedRow]:
    require_gpu()
    num_blocks = 2 * pairs
    shape = (num_blocks, dims.nt, dims.nh, dims.hd)
    make = lambda: torch.empty(shape, dtype=dims.dtype, device="cuda").normal_()  # noqa: E731
    keys = [make() for _ in range(dims.nl)]
    values = [make() for _ in range(dims.nl)]
    ids = torch.randperm(num_blocks)
    mapping = torch.stack([ids[:pairs], ids[pairs:]], dim=1).cuda()
    caches = keys + values
    cache_block = dims.nt * dims.nh * dims.hd * dims.itemsize
    rows = []
    host_mapping = mapping.cpu()
    for i, (name, swap, ref, passes) in enumerate(
        [
            ("copy_blocks", False, copy_blocks_reference, 2),
            ("swap_blocks", True, swap_blocks_reference, 4),
        ],
        start=1,
    ):
        progress(i, 2, f"{name} {pairs} pairs x {len(caches)} caches")
        moved = passes * pairs * len(caches) * cache_block
        flat = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
        other = torch.empty_like(flat)
        plan = plan_paged(keys, values, host_mapping, swap)
        ms, copy_ms, torch_ms = median_ms(
            plan.run,
            lambda f=flat, o=other: o.copy_(f),
            lambda r=ref: r(caches, mapping),
            warmup=warmup,
            iters=iters,
        )
        del flat, other
        copy_bw, torch_bw = gbps(moved, copy_ms), gbps(moved, torch_ms)
        _check(swap, ref, keys, values, host_mapping)
        bw = gbps(moved, ms)
        plan_us = _plan_us(keys, values, host_mapping, swap)
        rows.append(
            PagedRow(
                name,
                dims.nl,
                pairs,
                cache_block,
                moved,
                round(ms, 4),
                round(bw, 1),
                round(plan_us, 1),
                round(torch_bw, 1),
                round(copy_bw, 1),
                round(bw / copy_bw, 3),
            )
        )
    return rows


def _plan_us(keys, values, mapping, swap: bool, repeats: int = 20) -> float:
    """Median host time of planning (all the checks), in microseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        plan_paged(keys, values, mapping, swap)
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def _check(swap: bool, ref, keys, values, mapping) -> None:
    """One more run on a copy of two layers, compared with the reference."""
    k, v = [keys[0].clone(), keys[1].clone()], [values[0].clone(), values[1].clone()]
    expected = [t.clone() for t in k + v]
    plan_paged(k, v, mapping, swap).run()
    ref(expected, mapping)
    for got, want in zip(k + v, expected, strict=True):
        if not torch.equal(got, want):
            raise AssertionError("the kernel's result differs from the reference")
