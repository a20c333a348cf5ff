"""copy_blocks / swap_blocks on a paged cache, against a plain device copy of the same bytes.

The cache is an engine's: per layer a key and a value tensor ``[num_blocks, nt, nh, hd]``.
``pairs`` mappings between distinct blocks are copied or swapped in every cache (or copied
into a second set of caches of the same shape) with one launch, planned once (the checks of
the mapping and caches are timed apart, on the host, as ``plan_us``). Peers, timed interleaved
with the kernel: a plain device copy of the same number of bytes (the ceiling) and the same
work done with torch indexing, one layer and cache at a time.
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


@dataclass(frozen=True)
class _Case:
    name: str
    swap: bool
    #: Copy into a second set of caches (``dst_key_caches`` / ``dst_value_caches``).
    across: bool
    #: Block-sized passes over memory per pair and cache: a copy reads one and writes one, a
    #: swap reads and writes two.
    passes: int


CASES = (
    _Case("copy_blocks", False, False, 2),
    _Case("swap_blocks", True, False, 4),
    _Case("copy_blocks to other caches", False, True, 2),
)


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
    for i, case in enumerate(CASES, start=1):
        progress(i, len(CASES), f"{case.name} {pairs} pairs x {len(caches)} caches")
        dst = ([make() for _ in keys], [make() for _ in values]) if case.across else (None, None)
        dst_caches = dst[0] + dst[1] if case.across else caches
        moved = case.passes * pairs * len(caches) * cache_block
        flat = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
        other = torch.empty_like(flat)
        plan = plan_paged(keys, values, host_mapping, case.swap, *dst)

        def by_indexing(case=case, dst_caches=dst_caches):
            if case.swap:
                swap_blocks_reference(caches, mapping)
            else:
                copy_blocks_reference(caches, mapping, dst_caches)

        ms, copy_ms, torch_ms = median_ms(
            plan.run,
            lambda f=flat, o=other: o.copy_(f),
            by_indexing,
            warmup=warmup,
            iters=iters,
        )
        del flat, other
        copy_bw, torch_bw = gbps(moved, copy_ms), gbps(moved, torch_ms)
        _check(case, keys, values, host_mapping)
        bw = gbps(moved, ms)
        plan_us = _plan_us(keys, values, host_mapping, case.swap, dst)
        del dst, dst_caches
        rows.append(
            PagedRow(
                case.name,
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


def _plan_us(keys, values, mapping, swap: bool, dst, repeats: int = 20) -> float:
    """Median host time of planning (all the checks), in microseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        plan_paged(keys, values, mapping, swap, *dst)
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def _check(case: _Case, keys, values, mapping) -> None:
    """One more run on copies of two layers, compared with the reference."""
    k, v = [keys[0].clone(), keys[1].clone()], [values[0].clone(), values[1].clone()]
    dst = ([t.clone() for t in k], [t.clone() for t in v]) if case.across else (None, None)
    dst_caches = dst[0] + dst[1] if case.across else k + v
    sources = [t.clone() for t in k + v]
    expected = [t.clone() for t in dst_caches]
    plan_paged(k, v, mapping, case.swap, *dst).run()
    if case.swap:
        swap_blocks_reference(expected, mapping)
    else:
        copy_blocks_reference(sources, mapping, expected)
    for got, want in zip(dst_caches, expected, strict=True):
        if not torch.equal(got, want):
            raise AssertionError(f"{case.name}: the kernel's result differs from the reference")
