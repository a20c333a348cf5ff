"""The TransferManager against the paths under it.

``manager``: blocks move between a fully contiguous pinned layout and, on the GPU, an
engine-style layer-separate cache (``lw_to_fc`` d2h and ``fc_to_lw`` h2d), a cache with each
layer's K and V apart (an outer-separate layout, SGLang's: ``os_to_fc`` and ``fc_to_os``) or a
fully contiguous layout (``fc_to_fc``, whole blocks), once through ``execute_transfer``
(``strategy`` says which path it took; with ``copy_engine`` the manager prefers the copy
engine, which stages the cases with separate regions) and once through the copy kernel alone
with the same address tables.
``*_gbps`` are GPU time (CUDA events; the manager is given the caller's stream so the events
see its work), timed interleaved. Block ``i`` of the device layout pairs with block ``i`` of
the pinned one (``pinned_ids`` consecutive), or with one at a random place (``scattered``, as
in a pinned pool after some churn: neighbouring blocks seldom move together, so the copy
engine can seldom join them into longer copies). ``*_wall_gbps`` are wall-clock throughput of
calls issued back to back on the manager's own streams, which also counts the host's cost per
call when it exceeds the GPU's; ``call_us`` is that cost, the median host time of one
``execute_transfer``.

``disk``: a fully contiguous pinned layout to and from a file of the same layout, against
``dd`` with ``oflag=direct`` / ``iflag=direct`` moving the same bytes on the same filesystem in
the same run (wall clock, median of ``repeats``).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import tempfile
import time
from collections import deque
from dataclasses import dataclass, replace

import torch

from kvblocks.benchmarks.timing import gbps, median_ms, progress, require_gpu
from kvblocks.kernels import pinned_programs, plan_copy
from kvblocks.layout import KvDims, LayoutConfig
from kvblocks.storage import PhysicalLayout
from kvblocks.transfer import (
    FillPattern,
    TransferCompleteNotification,
    TransferManager,
    TransferOptions,
    TransferPreferences,
    block_checksums,
    block_checksums_as,
    fill_blocks,
)


@dataclass(frozen=True)
class ManagerRow:
    tokens_per_block: int
    num_blocks: int
    direction: str
    pattern: str
    pinned_ids: str
    strategy: str
    total_bytes: int
    kernel_gbps: float
    manager_gbps: float
    ratio: float
    kernel_wall_gbps: float
    manager_wall_gbps: float
    wall_ratio: float
    call_us: float


@dataclass(frozen=True)
class DiskRow:
    tokens_per_block: int
    num_blocks: int
    direction: str
    total_bytes: int
    direct_io: bool
    kvblocks_gbps: float
    dd_gbps: float
    ratio: float


def _wall_gbps(fn, nbytes: int, min_seconds: float = 0.2, depth: int = 4) -> float:
    """Throughput of ``fn`` called back to back until ``min_seconds`` have passed.

    ``fn`` returns a notification of its work. At most ``depth`` calls are in flight: the
    host waits for the oldest before issuing more, so that it cannot queue far more work
    than the time allows (its calls take far less time than large transfers).
    """
    torch.cuda.synchronize()
    in_flight: deque[TransferCompleteNotification] = deque()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds or calls < 3:
        in_flight.append(fn())
        calls += 1
        if len(in_flight) > depth:
            in_flight.popleft().wait()
    torch.cuda.synchronize()
    return nbytes * calls / (time.perf_counter() - start) / 1e9


def _on_current_stream(fn) -> TransferCompleteNotification:
    """Run ``fn`` (which enqueues GPU work on the current stream) and notify its end."""
    fn()
    event = torch.cuda.Event()
    event.record()
    return TransferCompleteNotification.from_event(event)


def run_manager(
    dims_for,
    tokens_per_block,
    num_blocks,
    warmup=5,
    iters=50,
    copy_engine: bool = False,
    scattered: bool = False,
) -> list[ManagerRow]:
    """Rows of the manager against the kernel alone; ``copy_engine`` builds the manager with
    ``TransferPreferences(copy_engine=True)`` (its staged transfers); ``scattered`` takes the
    pinned layout's blocks in a random order."""
    device = require_gpu()
    rows = []
    total = len(tokens_per_block) * len(num_blocks) * 6
    step = 0
    builder = TransferManager.builder().cuda_device_id(device.index or 0)
    builder = builder.preferences(TransferPreferences(copy_engine=copy_engine))
    with builder.build() as manager:
        for nt in tokens_per_block:
            dims: KvDims = dims_for(nt)
            most = max(num_blocks)
            config = LayoutConfig.from_dims(dims, most)
            index = device.index or 0
            gpu = manager.register_layout(
                PhysicalLayout.builder(config).layer_separate().allocate_device(index).build()
            )
            gpu_fc = manager.register_layout(
                PhysicalLayout.builder(config).fully_contiguous().allocate_device(index).build()
            )
            gpu_os = manager.register_layout(
                PhysicalLayout.builder(config).outer_separate().allocate_device(index).build()
            )
            host = manager.register_layout(
                PhysicalLayout.builder(config).fully_contiguous().allocate_pinned().build()
            )
            for h in (gpu, gpu_fc, gpu_os, host):
                fill_blocks(manager.layout(h), range(most), FillPattern.sequential())
            order = torch.randperm(most, generator=torch.Generator().manual_seed(nt))
            for nb in num_blocks:
                ids = list(range(nb))
                pinned_ids = order[:nb].tolist() if scattered else ids
                nbytes = nb * dims.block_bytes
                for direction, src, dst, pattern in (
                    ("d2h", gpu, host, "lw_to_fc"),
                    ("h2d", host, gpu, "fc_to_lw"),
                    ("d2h", gpu_os, host, "os_to_fc"),
                    ("h2d", host, gpu_os, "fc_to_os"),
                    ("d2h", gpu_fc, host, "fc_to_fc"),
                    ("h2d", host, gpu_fc, "fc_to_fc"),
                ):
                    step += 1
                    progress(step, total, f"manager tpb={nt} N={nb} {direction}")
                    s_ids, d_ids = (pinned_ids, ids) if src == host else (ids, pinned_ids)
                    s_layout, d_layout = manager.layout(src).layout, manager.layout(dst).layout
                    plan = plan_copy(
                        s_layout.region_table(s_ids),
                        d_layout.region_table(d_ids),
                        dims.region_bytes,
                    )
                    programs = pinned_programs(src == host, dst == host, plan.step_bytes)
                    plan = replace(plan, programs=programs)
                    caller = TransferOptions(cuda_stream=torch.cuda.current_stream())

                    def through_manager(s=src, d=dst, o=caller, si=s_ids, di=d_ids):
                        manager.execute_transfer(s, si, d, di, o)

                    def on_pool(s=src, d=dst, si=s_ids, di=d_ids):
                        return manager.execute_transfer(s, si, d, di)

                    m_ms, k_ms = median_ms(through_manager, plan.run, warmup=warmup, iters=iters)
                    k_wall = _wall_gbps(lambda p=plan: _on_current_stream(p.run), nbytes)
                    m_wall = _wall_gbps(on_pool, nbytes)
                    check_moved(manager, src, s_ids, dst, d_ids)
                    rows.append(
                        ManagerRow(
                            nt,
                            nb,
                            direction,
                            pattern,
                            "scattered" if scattered else "consecutive",
                            manager.strategy(src, dst, num_blocks=nb).value,
                            nbytes,
                            round(gbps(nbytes, k_ms), 2),
                            round(gbps(nbytes, m_ms), 2),
                            round(k_ms / m_ms, 3),
                            round(k_wall, 2),
                            round(m_wall, 2),
                            round(m_wall / k_wall, 3),
                            round(_call_us(manager, src, s_ids, dst, d_ids), 1),
                        )
                    )
            for h in (gpu, gpu_fc, gpu_os, host):
                manager.release_layout(h)
    return rows


def check_moved(manager: TransferManager, src, s_ids: list[int], dst, d_ids: list[int]) -> None:
    """Move ``s_ids`` into ``d_ids`` once more over poisoned destinations and compare a sample
    of blocks (in the destination's format)."""
    sample = sorted({0, len(s_ids) // 2, len(s_ids) - 1})
    s_sample, d_sample = [s_ids[i] for i in sample], [d_ids[i] for i in sample]
    source, destination = manager.layout(src), manager.layout(dst)
    fill_blocks(destination, d_sample, FillPattern.of_constant(0xAB))
    manager.execute_transfer(src, s_ids, dst, d_ids).wait()
    got = block_checksums(destination, d_sample)
    if got != block_checksums_as(source, s_sample, destination.kv_format):
        raise RuntimeError(f"the manager moved blocks {s_sample} wrongly: the figures are void")


def _call_us(manager: TransferManager, src, s_ids, dst, d_ids, repeats: int = 50) -> float:
    """Median host time of one execute_transfer call (the transfer itself is waited apart)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        note = manager.execute_transfer(src, s_ids, dst, d_ids)
        times.append((time.perf_counter() - start) * 1e6)
        note.wait()
    return statistics.median(times)


def _dd(args: list[str]) -> float:
    """Run dd; its wall time in seconds, as dd reports it."""
    proc = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    match = re.search(r"copied, ([0-9.]+) s", proc.stderr)
    if match is None:
        raise RuntimeError(f"cannot read dd's report: {proc.stderr.strip()}")
    return float(match.group(1))


def run_disk(dims_for, tokens_per_block, num_blocks, folder=None, repeats=5) -> list[DiskRow]:
    require_gpu()
    folder = folder or tempfile.gettempdir()
    rows = []
    total = len(tokens_per_block) * len(num_blocks)
    step = 0
    with TransferManager.builder().build() as manager:
        for nt in tokens_per_block:
            dims = dims_for(nt)
            most = max(num_blocks)
            config = LayoutConfig.from_dims(dims, most)
            host = manager.register_layout(
                PhysicalLayout.builder(config).fully_contiguous().allocate_pinned().build()
            )
            path = os.path.join(folder, f"kvblocks-bench-{os.getpid()}.bin")
            disk = manager.register_layout(
                PhysicalLayout.builder(config).fully_contiguous().allocate_disk(path).build()
            )
            direct = manager.layout(disk).file.direct
            fill_blocks(manager.layout(host), range(most), FillPattern.sequential())
            dd_file = os.path.join(folder, f"kvblocks-dd-{os.getpid()}.bin")
            for nb in num_blocks:
                step += 1
                progress(step, total, f"disk tpb={nt} N={nb}")
                ids = list(range(nb))
                nbytes = nb * dims.block_bytes
                bs = min(nbytes, 8 << 20)
                count = -(-nbytes // bs)
                for direction, src, dst, dd_args in (
                    (
                        "pinned_to_disk",
                        host,
                        disk,
                        [
                            "if=/dev/zero",
                            f"of={dd_file}",
                            f"bs={bs}",
                            f"count={count}",
                            "oflag=direct",
                        ],
                    ),
                    (
                        "disk_to_pinned",
                        disk,
                        host,
                        [
                            f"if={dd_file}",
                            "of=/dev/null",
                            f"bs={bs}",
                            f"count={count}",
                            "iflag=direct",
                        ],
                    ),
                ):
                    ours, theirs = [], []
                    for _ in range(repeats):
                        start = time.perf_counter()
                        manager.execute_transfer(src, ids, dst, ids).wait()
                        ours.append(time.perf_counter() - start)
                        theirs.append(_dd(dd_args))
                    mine = nbytes / statistics.median(ours) / 1e9
                    dd = bs * count / statistics.median(theirs) / 1e9
                    rows.append(
                        DiskRow(
                            nt,
                            nb,
                            direction,
                            nbytes,
                            direct,
                            round(mine, 2),
                            round(dd, 2),
                            round(mine / dd, 3),
                        )
                    )
            os.unlink(dd_file)
            manager.release_layout(host)
            manager.release_layout(disk)
    return rows
