"""Transfers to and from another worker's memory through NIXL, against the local path.

Two TransferManagers in this process, each with its own NIXL agent (UCX), stand for two workers
on one host. Blocks move between an engine-style layer-separate cache on this GPU and the other
worker's fully contiguous pinned layout (``lw_to_fc`` write, ``fc_to_lw`` read): ``direct``
lets NIXL read and write GPU memory (``allow_gpu_rdma``), ``staged`` goes through a pinned
bounce buffer and the copy kernel. Measured in the same run:

- ``nixl_alone_gbps``: NIXL itself moving the same bytes in one descriptor between one buffer
  of the memory NIXL touches on this side (GPU memory for ``direct``, pinned for ``staged``)
  and the other worker's layout: the ceiling of the transport NIXL found here;
- ``local_gbps``: the same blocks between the same GPU cache and a pinned layout of this
  worker (the copy kernel, zero copy), what a transfer within one worker costs.

Wall clock of ``execute_transfer(...).wait()`` (and of NIXL's transfer and poll), median of
``iters`` after ``warmup``.
"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass

import torch

from kvblocks.benchmarks.timing import progress, require_gpu
from kvblocks.layout import KvDims, LayoutConfig, MemoryRegion
from kvblocks.remote import MemKind, NixlOp, RemoteMemory, load_api, memory_of
from kvblocks.storage import PhysicalLayout
from kvblocks.transfer import (
    FillPattern,
    SerializedLayout,
    TransferCapabilities,
    TransferManager,
    block_checksums,
    fill_blocks,
)

ROUTES = ("direct", "staged")


@dataclass(frozen=True)
class RemoteRow:
    tokens_per_block: int
    num_blocks: int
    op: str
    pattern: str
    route: str
    strategy: str
    total_bytes: int
    nixl_gbps: float
    nixl_alone_gbps: float
    local_gbps: float
    ratio: float
    """``nixl_gbps / nixl_alone_gbps``."""


def _median_gbps(fn, nbytes: int, warmup: int, iters: int) -> float:
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def _three_digits(gbps: float) -> float:
    """``gbps`` to three significant digits (a slow link's few MB/s must not read 0.0)."""
    return float(f"{gbps:.3g}")


def nixl_alone_gbps(here, there, behind, op: NixlOp, on_gpu: bool, nbytes: int, warmup, iters):
    """NIXL moving ``nbytes`` in one descriptor between a fresh buffer here and the start of
    the other worker's layout ``behind``."""
    device = here.device if on_gpu else torch.device("cpu")
    pinned = not on_gpu and torch.cuda.is_available()
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pinned)
    kind, index = memory_of(device)
    registration = here.nixl.register([MemoryRegion(buffer.data_ptr(), nbytes)], kind, index)
    target = RemoteMemory(there.nixl.name, MemKind.DRAM, 0)
    remote = [(there.layout(behind).layout.memory[0].addr, nbytes, 0)]
    local = [(buffer.data_ptr(), nbytes, index)]
    try:
        return _median_gbps(
            lambda: here.nixl.transfer(op, local, kind, remote, target), nbytes, warmup, iters
        )
    finally:
        here.nixl.deregister(registration)


def _worker(name: str, gpu_rdma: bool, device: int) -> TransferManager:
    builder = TransferManager.builder().agent_name(f"kvblocks-bench-{name}-{uuid.uuid4().hex[:6]}")
    builder = builder.nixl_backend("UCX").cuda_device_id(device)
    return builder.capabilities(TransferCapabilities(allow_gpu_rdma=gpu_rdma)).build()


def run(dims_for, tokens_per_block, num_blocks, warmup=1, iters=5) -> list[RemoteRow]:
    """One row per (tokens per block, blocks, read or write, route)."""
    device = require_gpu()
    load_api()
    rows = []
    total = len(tokens_per_block) * len(num_blocks) * 2 * len(ROUTES)
    step = 0
    for route in ROUTES:
        index = device.index or 0
        with (
            _worker("here", route == "direct", index) as here,
            _worker("there", False, index) as there,
        ):
            for nt in tokens_per_block:
                dims: KvDims = dims_for(nt)
                most = max(num_blocks)
                config = LayoutConfig.from_dims(dims, most)
                gpu = here.register_layout(
                    PhysicalLayout.builder(config).layer_separate().allocate_device(index).build()
                )
                local = here.register_layout(
                    PhysicalLayout.builder(config).fully_contiguous().allocate_pinned().build()
                )
                behind = there.register_layout(
                    PhysicalLayout.builder(config).fully_contiguous().allocate_pinned().build()
                )
                remote = here.import_layout(
                    SerializedLayout.from_bytes(there.export_layout(behind).to_bytes())
                )
                fill_blocks(here.layout(gpu), range(most), FillPattern.sequential())
                for nb in num_blocks:
                    ids = list(range(nb))
                    nbytes = nb * dims.block_bytes
                    for op, pattern, pairs in (
                        (NixlOp.WRITE, "lw_to_fc", ((gpu, remote), (gpu, local))),
                        (NixlOp.READ, "fc_to_lw", ((remote, gpu), (local, gpu))),
                    ):
                        step += 1
                        progress(step, total, f"remote {route} tpb={nt} N={nb} {op.value}")
                        runs = [
                            lambda s=s, d=d, i=ids: here.execute_transfer(s, i, d, i).wait()
                            for s, d in pairs
                        ]
                        # NIXL alone first: its WRITE leaves other bytes in the remote layout.
                        alone = nixl_alone_gbps(
                            here, there, behind, op, route == "direct", nbytes, warmup, iters
                        )
                        nixl, mine = (_median_gbps(f, nbytes, warmup, iters) for f in runs)
                        r_src, r_dst = pairs[0]
                        rows.append(
                            RemoteRow(
                                nt,
                                nb,
                                op.value.lower(),
                                pattern,
                                route,
                                here.strategy(r_src, r_dst).value,
                                nbytes,
                                _three_digits(nixl),
                                _three_digits(alone),
                                _three_digits(mine),
                                round(nixl / alone, 3),
                            )
                        )
                    _check(here, there, gpu, local, behind, ids)
                for handle in (gpu, local, remote):
                    here.release_layout(handle)
                there.release_layout(behind)
    return rows


def _check(here, there, gpu, local, behind, ids) -> None:
    """Both writes must have left the GPU cache's blocks in the pinned layouts (the reads
    wrote the same bytes back into the cache)."""
    wanted = block_checksums(here.layout(gpu), ids)
    for physical in (here.layout(local), there.layout(behind)):
        if block_checksums(physical, ids) != wanted:
            raise RuntimeError("the transfers moved wrong bytes")
