"""Timing of GPU work with CUDA events, and the records benchmarks print."""

from __future__ import annotations

import csv
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, fields

import torch

from kvblocks.errors import BackendUnavailableError

#: GPU cycles of idle work queued ahead of each timed call, so that the host's launch cost is
#: hidden behind it and the events time the GPU's work alone (about 1 ms at 1.98 GHz; a
#: tenth of that was seen to be too short for a Python launch now and then).
LEAD_CYCLES = 2_000_000


def require_gpu() -> torch.device:
    """The current CUDA device, or an error saying benchmarks need one."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError("benchmarks need a CUDA GPU; none is visible here")
    return torch.device("cuda", torch.cuda.current_device())


#: Least wall time of warm-up. The GPU lowers its clocks while the host compiles or allocates;
#: a few short calls do not bring them back (seen on the H100: the first case timed after a
#: pause ran at 65% of the same case timed a moment later).
WARMUP_MS = 250.0


def _warm(fns: tuple[Callable[[], object], ...], warmup: int) -> None:
    start, calls = time.perf_counter(), 0
    while calls < warmup or (time.perf_counter() - start) * 1e3 < WARMUP_MS:
        for fn in fns:
            fn()
        calls += 1
        if calls % 8 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()


def _time_once(fn: Callable[[], object]) -> float:
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(LEAD_CYCLES)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def median_ms(*fns: Callable[[], object], warmup: int = 5, iters: int = 50) -> list[float]:
    """Median GPU time in milliseconds of each of ``fns``, timed in turn ``iters`` times.

    Timing several functions interleaved (a case and its ceiling) gives both the same
    conditions, which matters because the GPU's clocks drift over a run. Warm-up runs them at
    least ``warmup`` times and for at least :data:`WARMUP_MS`. Each timed call is bracketed by
    CUDA events on the current stream, behind a short GPU sleep so that the events measure the
    GPU's work and not the host's launch overhead. Work that the host issues more slowly than
    the GPU runs it (many small calls) still shows its cost.
    """
    _warm(fns, warmup)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, acc in zip(fns, times, strict=True):
            acc.append(_time_once(fn))
    return [statistics.median(t) for t in times]


def gbps(nbytes: int, ms: float) -> float:
    """Bandwidth in GB/s (10**9 bytes per second)."""
    return nbytes / ms / 1e6


_START = time.perf_counter()


def progress(i: int, total: int, label: str) -> None:
    """One line on stderr per case, with the seconds since the run began."""
    elapsed = time.perf_counter() - _START
    print(f"[{i}/{total} {elapsed:.0f}s] {label}", file=sys.stderr, flush=True)


def write_csv(rows: Iterable[object], out) -> None:
    """Write dataclass rows as CSV with a header (the field names)."""
    rows = list(rows)
    if not rows:
        return
    writer = csv.DictWriter(out, fieldnames=[f.name for f in fields(rows[0])])
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))


def cpu_name() -> str:
    """The CPU's model name, and how many cores this process may use."""
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
