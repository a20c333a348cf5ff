"""Markdown tables of a GPU run's CSVs, as docs/performance.md shows them.

Usage: python bench/report.py DIR   (DIR holds kvbench.csv, permute.csv, paged.csv)
"""

import csv
import sys
from collections import defaultdict
from pathlib import Path


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def permute_table(rows: list[dict]) -> str:
    sizes = sorted({(int(r["nt"]), int(r["nh"])) for r in rows})
    by = defaultdict(dict)
    for r in rows:
        by[r["conversion"]][(int(r["nt"]), int(r["nh"]))] = r
    head = "| conversion | " + " | ".join(f"nt={nt} nh={nh}" for nt, nh in sizes) + " |"
    lines = [head, "|---" * (len(sizes) + 1) + "|"]
    for conv, cells in by.items():
        vals = [
            f"{float(cells[s]['bandwidth_gbps']):.0f} ({float(cells[s]['ratio']):.2f})"
            for s in sizes
        ]
        lines.append(f"| {conv} | " + " | ".join(vals) + " |")
    copies = [f"{float(next(iter(by.values()))[s]['copy_gbps']):.0f}" for s in sizes]
    lines.append("| *plain device copy* | " + " | ".join(copies) + " |")
    ratios = [float(r["ratio"]) for r in rows]
    lines.append("")
    lines.append(
        f"Every conversion: lowest ratio {min(ratios):.3f}, median "
        f"{sorted(ratios)[len(ratios) // 2]:.3f} ({len(ratios)} cases)."
    )
    return "\n".join(lines)


def kvbench_table(rows: list[dict]) -> str:
    lines = [
        "| tpb | blocks | pattern | dir | copies x size | kernel GB/s | memcpy_batch GB/s |"
        " memcpy GB/s | bulk copy GB/s | kernel / bulk |",
        "|---" * 10 + "|",
    ]
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["tokens_per_block"], r["num_blocks"], r["pattern"], r["direction"])][
            r["backend"]
        ] = r
    for (tpb, nb, pattern, direction), b in groups.items():
        k = b.get("kernel")
        size = int(k["copy_size"])
        size_text = f"{size // 1024} KiB" if size < 1 << 20 else f"{size / 2**20:.0f} MiB"
        cells = [
            f"{float(b[x]['bandwidth_gbps']):.1f}" if x in b else "-"
            for x in ("kernel", "memcpy_batch", "memcpy")
        ]
        lines.append(
            f"| {tpb} | {nb} | {pattern} | {direction} | {k['num_copies']} x {size_text} | "
            + " | ".join(cells)
            + f" | {float(k['ceiling_gbps']):.1f} | {float(k['ratio']):.3f} |"
        )
    return "\n".join(lines)


def paged_table(rows: list[dict]) -> str:
    lines = [
        "| op | layers x K,V | pairs | kernel GB/s | ratio to copy | torch indexing GB/s |"
        " plain copy GB/s | planning (host) |",
        "|---" * 8 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['num_layers']} x 2 | {r['pairs']} | "
            f"{float(r['bandwidth_gbps']):.0f} | {float(r['ratio']):.3f} | "
            f"{float(r['torch_indexing_gbps']):.0f} | "
            f"{float(r['copy_gbps']):.0f} | {float(r['plan_us']):.0f} us |"
        )
    return "\n".join(lines)


def transfers_table(rows: list[dict]) -> str:
    lines = [
        "| tpb | blocks | direction | kernel GB/s | manager GB/s | ratio | kernel wall GB/s |"
        " manager wall GB/s | wall ratio | host us per call |",
        "|---" * 10 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens_per_block']} | {r['num_blocks']} | {r['direction']} ({r['pattern']}) | "
            f"{r['kernel_gbps']} | {r['manager_gbps']} | {r['ratio']} | {r['kernel_wall_gbps']} | "
            f"{r['manager_wall_gbps']} | {r['wall_ratio']} | {float(r['call_us']):.0f} |"
        )
    return "\n".join(lines)


def disk_table(rows: list[dict]) -> str:
    lines = [
        "| tpb | blocks | direction | bytes | O_DIRECT | kvblocks GB/s | dd GB/s | ratio |",
        "|---" * 8 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens_per_block']} | {r['num_blocks']} | {r['direction']} | "
            f"{int(r['total_bytes']) / 2**20:.0f} MiB | {r['direct_io']} | {r['kvblocks_gbps']} | "
            f"{r['dd_gbps']} | {r['ratio']} |"
        )
    return "\n".join(lines)


def pool_table(rows: list[dict]) -> str:
    lines = ["| operation | blocks | median us | blocks per second |", "|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['operation']} | {r['blocks']} | {r['median_us']} | "
            f"{int(r['blocks_per_second']):,} |"
        )
    return "\n".join(lines)


SECTIONS = [
    ("permute.csv", "Permutes", permute_table),
    ("kvbench.csv", "kvbench", kvbench_table),
    ("paged.csv", "copy_blocks / swap_blocks", paged_table),
    ("transfers.csv", "TransferManager: device <-> pinned", transfers_table),
    ("disk.csv", "TransferManager: pinned <-> disk", disk_table),
    ("pool.csv", "Block pool (CPU)", pool_table),
]

if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results")
    for name, title, table in SECTIONS:
        if (folder / name).exists():
            print(f"## {title}\n\n{table(read(folder / name))}\n")
