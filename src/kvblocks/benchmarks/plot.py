"""A PNG of bandwidth per case from a benchmark's CSV (needs matplotlib)."""

from __future__ import annotations

import csv
from pathlib import Path

from kvblocks.errors import BackendUnavailableError

#: Columns that hold results or sizes rather than naming the case.
_MEASURES = {
    "total_bytes",
    "inner_bytes",
    "copy_size",
    "num_copies",
    "median_ms",
    "bandwidth_gbps",
    "ceiling_gbps",
    "copy_gbps",
    "ratio",
    "plan_us",
    "bytes_moved",
    "block_bytes",
    "torch_indexing_gbps",
}
_CEILINGS = ("ceiling_gbps", "copy_gbps")


def plot_csv(csv_path: str | Path, png_path: str | Path, title: str = "") -> None:
    """One horizontal bar per row (its bandwidth), with the row's ceiling marked where known."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BackendUnavailableError("--plot needs matplotlib (pip install matplotlib)") from None
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{csv_path} holds no rows")
    labels = [" ".join(v for k, v in r.items() if k not in _MEASURES) for r in rows]
    values = [float(r["bandwidth_gbps"]) for r in rows]
    ceiling_key = next((k for k in _CEILINGS if k in rows[0]), None)
    fig, ax = plt.subplots(figsize=(10, 0.25 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh(y, values, color="tab:blue", label="bandwidth")
    if ceiling_key:
        ceilings = [float(r[ceiling_key]) for r in rows]
        ax.scatter(ceilings, y, marker="|", color="tab:red", s=120, label="ceiling (same run)")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("GB/s")
    ax.set_title(title or Path(csv_path).stem, loc="right")
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=2, frameon=False)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
