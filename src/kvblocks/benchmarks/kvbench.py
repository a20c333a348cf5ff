"""kvbench: KV block transfers between fully contiguous and layer-wise layouts.

For each tokens-per-block and block count, ``num_blocks`` blocks of a model move in one of three
patterns, in one of three directions, through one of three backends:

==========  ==========================================================================
pattern     what is copied
==========  ==========================================================================
fc_to_fc    whole blocks between two fully contiguous layouts (one pair per block)
lw_to_fc    each ``(layer, outer)`` region of a layer-separate layout into a fully
            contiguous one (``nl * no`` pairs per block, ``inner_bytes`` each)
fc_to_lw    the reverse
==========  ==========================================================================

Directions: ``h2d`` (source in pinned host memory), ``d2h``, ``d2d``. Backends: ``kernel``
(:func:`vectorized_copy`, which reads or writes pinned host memory itself, on
:func:`~kvblocks.kernels.pinned_programs` programs), ``memcpy_batch``
(one ``cudaMemcpyBatchAsync``), ``memcpy`` (one ``cudaMemcpyAsync`` per pair), and for ``h2d``
only ``staged`` (:func:`~kvblocks.kernels.plan_staged_h2d`: the copy engine moves the sources'
contiguous runs into device memory in bulk and the copy kernel places each pair from there).

Each row also carries its ceiling, timed interleaved with it: one bulk copy of the same bytes
(pinned host<->device for h2d/d2h, device copy for d2d), and the row's ratio to it.
``bandwidth_gbps`` counts the bytes moved once (``total_bytes / time``), as the seed does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kvblocks.benchmarks.timing import gbps, median_ms, progress, require_gpu
from kvblocks.kernels import pinned_programs, plan_copy, plan_memcpy, plan_staged_h2d
from kvblocks.layout import (
    FullyContiguousLayout,
    KvDims,
    LayerSeparateLayout,
    LayoutConfig,
    MemoryRegion,
)

PATTERNS = ("fc_to_fc", "lw_to_fc", "fc_to_lw")
DIRECTIONS = ("h2d", "d2h", "d2d")
BACKENDS = ("kernel", "memcpy_batch", "memcpy", "staged")

#: The directions each backend runs in (``staged`` is a host-to-device path).
_BACKEND_DIRECTIONS = {"staged": ("h2d",)}


@dataclass(frozen=True)
class KvbenchRow:
    tokens_per_block: int
    num_blocks: int
    pattern: str
    direction: str
    backend: str
    total_bytes: int
    inner_bytes: int
    copy_size: int
    num_copies: int
    median_ms: float
    bandwidth_gbps: float
    ceiling_gbps: float
    ratio: float


class _Side:
    """One place blocks live: a fully contiguous and a layer-separate layout of ``num_blocks``."""

    def __init__(self, dims: KvDims, num_blocks: int, where: str) -> None:
        config = LayoutConfig.from_dims(dims, num_blocks)
        device = "cuda" if where == "device" else "cpu"
        pinned = where == "pinned"
        self.fc_tensor = torch.empty(
            config.total_bytes, dtype=torch.uint8, device=device, pin_memory=pinned
        )
        per_layer = LayerSeparateLayout.required_allocations(config)[0]
        self.lw_tensors = [
            torch.empty(per_layer, dtype=torch.uint8, device=device, pin_memory=pinned)
            for _ in range(dims.nl)
        ]
        for t in (self.fc_tensor, *self.lw_tensors):
            t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, device="cuda"))
        self.fc = FullyContiguousLayout(config, MemoryRegion.of(self.fc_tensor))
        self.lw = LayerSeparateLayout(config, [MemoryRegion.of(t) for t in self.lw_tensors])

    def allocations(self) -> list[MemoryRegion]:
        """The tensors' memory."""
        return [MemoryRegion.of(t) for t in (self.fc_tensor, *self.lw_tensors)]

    def bytes_at(self, addr: int, size: int) -> torch.Tensor:
        """The ``size`` bytes at ``addr``, as a slice of the tensor that holds them."""
        for t in (self.fc_tensor, *self.lw_tensors):
            offset = addr - t.data_ptr()
            if 0 <= offset and offset + size <= t.numel():
                return t[offset : offset + size]
        raise ValueError(f"{addr:#x} is not in this side's memory")


def _pairs(pattern: str, src: _Side, dst: _Side, ids: list[int]):
    if pattern == "fc_to_fc":
        return src.fc.block_table(ids), dst.fc.block_table(ids), src.fc.config.block_bytes
    size = src.fc.config.region_bytes
    if pattern == "lw_to_fc":
        return src.lw.region_table(ids), dst.fc.region_table(ids), size
    return src.fc.region_table(ids), dst.lw.region_table(ids), size


def _check_sample(src: _Side, dst: _Side, src_table, dst_table, size: int) -> None:
    """Compare a few copied spans, so a broken path is never reported as fast."""
    n = len(src_table)
    for i in sorted({0, n // 2, n - 1}):
        if not torch.equal(
            src.bytes_at(src_table[i], size).cpu(), dst.bytes_at(dst_table[i], size).cpu()
        ):
            raise AssertionError(f"pair {i} was not copied correctly")


def run(
    dims_for,
    tokens_per_block: list[int],
    num_blocks: list[int],
    patterns: list[str],
    directions: list[str],
    backends: list[str],
    warmup: int = 5,
    iters: int = 50,
) -> list[KvbenchRow]:
    """Measure every combination; ``dims_for(nt)`` gives the block dims for ``nt`` tokens."""
    device = require_gpu()
    cases = [(d, b) for d in directions for b in backends if d in _BACKEND_DIRECTIONS.get(b, (d,))]
    total = len(tokens_per_block) * len(num_blocks) * len(patterns) * len(cases)
    rows, step = [], 0
    for nt in tokens_per_block:
        dims = dims_for(nt)
        most = max(num_blocks)
        host = _Side(dims, most, "pinned")
        dev = _Side(dims, most, "device")
        dev2 = _Side(dims, most, "device") if "d2d" in directions else None
        for nb in num_blocks:
            ids = list(range(nb))
            nbytes = nb * dims.block_bytes
            for direction in directions:
                src, dst = {"h2d": (host, dev), "d2h": (dev, host), "d2d": (dev, dev2)}[direction]
                bulk_src = src.fc_tensor[:nbytes]
                bulk_dst = dst.fc_tensor[:nbytes]

                def bulk(d=bulk_dst, s=bulk_src):
                    d.copy_(s, non_blocking=True)

                for pattern in patterns:
                    src_table, dst_table, size = _pairs(pattern, src, dst, ids)
                    for backend in backends:
                        if direction not in _BACKEND_DIRECTIONS.get(backend, (direction,)):
                            continue
                        step += 1
                        progress(step, total, f"tpb={nt} N={nb} {pattern} {direction} {backend}")
                        if backend == "kernel":
                            plan = plan_copy(src_table, dst_table, size, device)
                            programs = pinned_programs(src is host, dst is host, plan.step_bytes)
                            fn = replace(plan, programs=programs).run
                        elif backend == "staged":
                            held = src.allocations()
                            fn = plan_staged_h2d(src_table, dst_table, size, held, device).run
                        else:
                            mplan = plan_memcpy(src_table, dst_table, size)
                            batched = backend == "memcpy_batch"
                            fn = lambda p=mplan, b=batched: p.run(batched=b)  # noqa: E731
                        ms, bulk_ms = median_ms(fn, bulk, warmup=warmup, iters=iters)
                        fn()  # the interleaved bulk copy overwrote the destination
                        torch.cuda.synchronize()
                        _check_sample(src, dst, src_table, dst_table, size)
                        bw, ceiling = gbps(nbytes, ms), gbps(nbytes, bulk_ms)
                        rows.append(
                            KvbenchRow(
                                nt,
                                nb,
                                pattern,
                                direction,
                                backend,
                                nbytes,
                                dims.region_bytes,
                                size,
                                len(src_table),
                                round(ms, 4),
                                round(bw, 2),
                                round(ceiling, 2),
                                round(bw / ceiling, 3),
                            )
                        )
        del host, dev, dev2
        torch.cuda.empty_cache()
    return rows
