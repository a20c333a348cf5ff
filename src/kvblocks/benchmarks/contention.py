"""Transfers while the engine computes: how much each route slows the engine's work, and how
much the work slows the transfer.

A BlockManager offloads and onboards blocks in the background while the engine runs its
model. Two routes move blocks between an engine-style layer-separate cache on the GPU
(``OperationalNHD``) and whole blocks in pinned memory (``fc_to_lw`` h2d, ``lw_to_fc`` d2h),
stored in the same format (a copy) or in ``UniversalTP`` (a permute; the BlockManager's
default for G2):

- ``kernel``: the copy or permute kernel reads (or writes) pinned memory itself, on the few
  programs of :func:`~kvblocks.kernels.pinned_programs`, which wait on PCIe;
- ``staged``: the copy engine moves whole blocks between pinned memory and a slot of device
  memory, and a kernel places (or gathers) them at device-memory speed, holding SMs only for
  that (``TransferPreferences(copy_engine=True)``).

Each route is timed against two kinds of engine-like work, issued on another stream:
``gemm`` (bf16 matrix products of 8192 x 8192, compute bound, like a prefill) and ``stream``
(copies of 1 GiB in device memory, memory bound, like a decode step). The work is sized to take
about as long as the transfer alone. Each repetition times the transfer alone, the work alone,
and both started at once (from one event, behind a GPU sleep long enough for the host to queue
both), each by CUDA events on its own stream; medians over ``iters`` repetitions.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvblocks.benchmarks.timing import progress, require_gpu
from kvblocks.benchmarks.transfers import check_moved
from kvblocks.layout import KvBlockLayout, LayoutConfig
from kvblocks.storage import PhysicalLayout
from kvblocks.transfer import (
    FillPattern,
    TransferManager,
    TransferOptions,
    TransferPreferences,
    fill_blocks,
)

WORKS = ("gemm", "stream")
ROUTES = ("kernel", "staged")
#: Formats of the pinned blocks: the device cache's own, and the BlockManager's G2 default.
HOST_FORMATS = (KvBlockLayout.OperationalNHD, KvBlockLayout.UniversalTP)

#: GPU cycles of sleep ahead of each timed repetition (about 20 ms at 1.98 GHz): the host
#: queues the work and the transfer (a staged one costs it a few ms) behind it.
LEAD_CYCLES = 40_000_000

_GEMM_N = 8192
_STREAM_BYTES = 1 << 30


@dataclass(frozen=True)
class ContentionRow:
    tokens_per_block: int
    num_blocks: int
    direction: str
    host_format: str
    route: str
    strategy: str
    work: str
    total_bytes: int
    transfer_alone_gbps: float
    transfer_shared_gbps: float
    work_alone_ms: float
    work_shared_ms: float
    transfer_slowdown: float
    """Transfer time with the work beside it, over its time alone."""
    work_slowdown: float
    """Work time with the transfer beside it, over its time alone."""
    both_ms: float
    """From the common start to the end of the later of the two."""


@dataclass(frozen=True)
class _Timing:
    transfer_ms: float  # 0 when no transfer ran
    work_ms: float  # 0 when no work ran

    @property
    def both_ms(self) -> float:
        return max(self.transfer_ms, self.work_ms)


class _Work:
    """Engine-like work on the GPU: ``reps`` repetitions of one kernel, queued on the current
    stream by :meth:`__call__`."""

    def __init__(self, kind: str, device: torch.device) -> None:
        self.kind = kind
        self.reps = 1
        if kind == "gemm":
            shape = (_GEMM_N, _GEMM_N)
            a, b = (torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(2))
            out = torch.empty(shape, device=device, dtype=torch.bfloat16)
            self._once = lambda: torch.mm(a, b, out=out)
        else:
            src = torch.randint(0, 255, (_STREAM_BYTES,), device=device, dtype=torch.uint8)
            dst = torch.empty_like(src)
            self._once = lambda: dst.copy_(src)

    def __call__(self) -> None:
        for _ in range(self.reps):
            self._once()

    def size_to(self, ms: float, streams: tuple[torch.cuda.Stream, torch.cuda.Stream]) -> None:
        """Repeat the kernel enough times to take about ``ms`` milliseconds alone."""
        self.reps = 1
        for _ in range(3):
            self._once()
        once = _timed(self._once, None, *streams).work_ms
        self.reps = max(1, math.ceil(ms / once))


def _timed(
    work: Callable[[], object] | None,
    transfer: Callable[[], object] | None,
    work_stream: torch.cuda.Stream,
    transfer_stream: torch.cuda.Stream,
) -> _Timing:
    """Start ``work`` and ``transfer`` (either may be None; each queues its GPU work on the
    current stream) at once on their streams; each one's GPU time, and the time to the end of
    both."""
    main = torch.cuda.current_stream()
    torch.cuda._sleep(LEAD_CYCLES)
    go = torch.cuda.Event(enable_timing=True)
    go.record(main)
    ends = {}
    for name, fn, stream in (("work", work, work_stream), ("transfer", transfer, transfer_stream)):
        if fn is None:
            continue
        stream.wait_event(go)
        end = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            fn()
            end.record(stream)
        main.wait_stream(stream)
        ends[name] = end
    torch.cuda.synchronize()
    ms = {name: go.elapsed_time(end) for name, end in ends.items()}
    return _Timing(ms.get("transfer", 0.0), ms.get("work", 0.0))


def run(dims_for, tokens_per_block, num_blocks, iters: int = 20) -> list[ContentionRow]:
    """Rows of every direction x route x work for each tokens per block and block count."""
    device = require_gpu()
    works = [_Work(kind, device) for kind in WORKS]
    streams = (torch.cuda.Stream(), torch.cuda.Stream())  # the work's, the transfer's
    rows = []
    total = len(tokens_per_block) * len(num_blocks) * len(HOST_FORMATS) * 2 * len(ROUTES)
    for nt in tokens_per_block:
        dims = dims_for(nt)
        for route in ROUTES:
            prefs = TransferPreferences(copy_engine=route == "staged", staged_min_bytes=None)
            builder = TransferManager.builder().cuda_device_id(device.index or 0)
            with builder.preferences(prefs).build() as manager:
                for nb, fmt, direction in itertools.product(
                    num_blocks, HOST_FORMATS, ("h2d", "d2h")
                ):
                    progress(
                        len(rows) // len(works) + 1,
                        total,
                        f"contention tpb={nt} N={nb} {direction} {fmt.name} {route}",
                    )
                    config = LayoutConfig.from_dims(dims, nb)
                    rows += _rows(manager, config, fmt, direction, route, works, streams, iters)
    return rows


def _rows(
    manager, config, host_fmt, direction, route, works, streams, iters
) -> list[ContentionRow]:
    """One row per work: the ``config.num_blocks`` blocks of a layer-separate device layout
    and of a fully contiguous pinned one in ``host_fmt`` moved ``direction`` by ``manager``."""
    nb = config.num_blocks
    index = torch.cuda.current_device()
    device_fmt = HOST_FORMATS[0]
    gpu = manager.register_layout(
        PhysicalLayout.builder(config)
        .layer_separate()
        .kv_format(device_fmt)
        .allocate_device(index)
        .build()
    )
    host = manager.register_layout(
        PhysicalLayout.builder(config)
        .fully_contiguous()
        .kv_format(host_fmt)
        .allocate_pinned()
        .build()
    )
    ids = list(range(nb))
    for h in (gpu, host):
        fill_blocks(manager.layout(h), ids, FillPattern.sequential())
    src, dst = (host, gpu) if direction == "h2d" else (gpu, host)

    def transfer():
        options = TransferOptions(cuda_stream=torch.cuda.current_stream())
        manager.execute_transfer(src, ids, dst, ids, options)

    for _ in range(3):
        _timed(None, transfer, *streams)
    alone = _timed(None, transfer, *streams).transfer_ms
    nbytes = nb * config.block_bytes
    strategy = manager.strategy(src, dst, num_blocks=nb).value
    rows = []
    for work in works:
        work.size_to(alone, streams)
        samples = [
            (
                _timed(None, transfer, *streams),
                _timed(work, None, *streams),
                _timed(work, transfer, *streams),
            )
            for _ in range(iters)
        ]
        case = (config.page_size, nb, direction, host_fmt.name, route, strategy)
        rows.append(_row(case, work, nbytes, samples))
    check_moved(manager, src, ids, dst, ids)
    for h in (gpu, host):
        manager.release_layout(h)
    return rows


def _row(case: tuple, work: _Work, nbytes: int, samples: list) -> ContentionRow:
    """The row of ``case`` (tokens per block, blocks, direction, host format, route,
    strategy) from ``samples`` of (transfer alone, work alone, both)."""
    t_alone = statistics.median(s[0].transfer_ms for s in samples)
    w_alone = statistics.median(s[1].work_ms for s in samples)
    t_shared = statistics.median(s[2].transfer_ms for s in samples)
    w_shared = statistics.median(s[2].work_ms for s in samples)
    both = statistics.median(s[2].both_ms for s in samples)
    return ContentionRow(
        *case,
        f"{work.kind} x{work.reps}",
        nbytes,
        round(nbytes / t_alone / 1e6, 2),
        round(nbytes / t_shared / 1e6, 2),
        round(w_alone, 3),
        round(w_shared, 3),
        round(t_shared / t_alone, 3),
        round(w_shared / w_alone, 3),
        round(both, 3),
    )
