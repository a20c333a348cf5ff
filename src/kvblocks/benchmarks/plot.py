"""PNGs of results: a bar per case from a benchmark's CSV (needs matplotlib, extra ``plot``)."""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from kvblocks.errors import BackendUnavailableError, InvalidArgumentError


@dataclass(frozen=True)
class Measure:
    """What a suite's plot draws: one bar per row from ``value``, a mark at ``reference``."""

    value: str
    reference: str | None
    reference_label: str
    unit: str


#: The measures plots know, in order of preference: a CSV is drawn with the first whose
#: columns it has (kvbench and paged, permute, transfers, disk, remote, sharing, peers,
#: contention, pool).
MEASURES = (
    Measure("bandwidth_gbps", "ceiling_gbps", "ceiling (same run)", "GB/s"),
    Measure("bandwidth_gbps", "copy_gbps", "device copy (same run)", "GB/s"),
    Measure("manager_gbps", "kernel_gbps", "kernel alone (same run)", "GB/s"),
    Measure("kvblocks_gbps", "dd_gbps", "dd (same run)", "GB/s"),
    Measure("nixl_gbps", "nixl_alone_gbps", "NIXL alone (same run)", "GB/s"),
    Measure("sharing_gbps", "parts_gbps", "NIXL alone + local lookup (same run)", "GB/s"),
    Measure("news_ms", "ask_all_ms", "every peer asked (same run)", "ms"),
    Measure("work_shared_ms", "work_alone_ms", "work alone (same run)", "ms"),
    Measure("blocks_per_second", None, "", "blocks/s"),
)

#: Columns that hold results or sizes rather than naming the case.
_RESULTS = {
    "total_bytes",
    "inner_bytes",
    "copy_size",
    "num_copies",
    "median_ms",
    "median_us",
    "bandwidth_gbps",
    "ceiling_gbps",
    "copy_gbps",
    "kernel_gbps",
    "manager_gbps",
    "kernel_wall_gbps",
    "manager_wall_gbps",
    "kvblocks_gbps",
    "dd_gbps",
    "nixl_gbps",
    "nixl_alone_gbps",
    "local_gbps",
    "blocks_per_second",
    "peer_lookup_ms",
    "peer_read_ms",
    "local_lookup_ms",
    "nixl_alone_ms",
    "peer_write_ms",
    "nixl_alone_write_ms",
    "sharing_gbps",
    "parts_gbps",
    "ratio",
    "wall_ratio",
    "plan_us",
    "call_us",
    "bytes_moved",
    "block_bytes",
    "torch_indexing_gbps",
    "ask_all_ms",
    "news_ms",
    "speedup",
    "ask_all_requests",
    "news_requests",
    "transfer_alone_gbps",
    "transfer_shared_gbps",
    "work_alone_ms",
    "work_shared_ms",
    "transfer_slowdown",
    "work_slowdown",
    "both_ms",
}


def require_matplotlib() -> None:
    """Raise :class:`BackendUnavailableError` unless matplotlib can be imported; cheap, so
    commands call it before long work whose result they are to draw."""
    if importlib.util.find_spec("matplotlib") is None:
        raise BackendUnavailableError(
            "--plot needs matplotlib, which is not installed: pip install 'kvblocks[plot]'"
        )


def pyplot():
    """``matplotlib.pyplot``, drawing to files only (the Agg backend)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def measure_of(columns: list[str]) -> Measure | None:
    """The measure a CSV with these columns is drawn with, or None if plots know none."""
    return next(
        (
            m
            for m in MEASURES
            if m.value in columns and (m.reference is None or m.reference in columns)
        ),
        None,
    )


def plot_csv(csv_path: str | Path, png_path: str | Path, title: str = "") -> None:
    """One horizontal bar per row of a benchmark's CSV (its :func:`measure_of`), with the
    reference measured in the same run marked where the suite has one."""
    plt = pyplot()
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise InvalidArgumentError(str(csv_path), "holds no rows")
    measure = measure_of(list(rows[0]))
    if measure is None:
        known = sorted({m.value for m in MEASURES})
        raise InvalidArgumentError(str(csv_path), f"has none of the columns plots draw ({known})")
    labels = [" ".join(v for k, v in r.items() if k not in _RESULTS) for r in rows]
    values = [float(r[measure.value]) for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.25 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh(y, values, color="tab:blue", label="measured")
    if measure.reference is not None:
        references = [float(r[measure.reference]) for r in rows]
        ax.scatter(references, y, marker="|", color="tab:red", s=120, label=measure.reference_label)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(measure.unit)
    ax.set_title(title or Path(csv_path).stem, loc="right")
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=2, frameon=False)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
