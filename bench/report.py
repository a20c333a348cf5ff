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


def markdown(columns: list[str], rows: list[list[object]]) -> str:
    """A Markdown table: a header of ``columns`` and one line per list of cells."""
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def permute_table(rows: list[dict]) -> str:
    sizes = sorted({(int(r["nt"]), int(r["nh"])) for r in rows})
    by = defaultdict(dict)
    for r in rows:
        by[r["conversion"]][(int(r["nt"]), int(r["nh"]))] = r
    body = [
        [conv]
        + [
            f"{float(cells[s]['bandwidth_gbps']):.0f} ({float(cells[s]['ratio']):.2f})"
            for s in sizes
        ]
        for conv, cells in by.items()
    ]
    first = next(iter(by.values()))
    body.append(["*plain device copy*"] + [f"{float(first[s]['copy_gbps']):.0f}" for s in sizes])
    ratios = [float(r["ratio"]) for r in rows]
    columns = ["conversion"] + [f"nt={nt} nh={nh}" for nt, nh in sizes]
    return (
        markdown(columns, body) + f"\n\nEvery conversion: lowest ratio {min(ratios):.3f}, median "
        f"{sorted(ratios)[len(ratios) // 2]:.3f} ({len(ratios)} cases)."
    )


def kvbench_table(rows: list[dict]) -> str:
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["tokens_per_block"], r["num_blocks"], r["pattern"], r["direction"])][
            r["backend"]
        ] = r
    body = []
    for (tpb, nb, pattern, direction), b in groups.items():
        k = b["kernel"]
        size = int(k["copy_size"])
        size_text = f"{size // 1024} KiB" if size < 1 << 20 else f"{size / 2**20:.0f} MiB"
        cells = [
            f"{float(b[x]['bandwidth_gbps']):.1f}" if x in b else "-"
            for x in ("kernel", "memcpy_batch", "memcpy", "staged")
        ]
        staged = f"{float(b['staged']['ratio']):.3f}" if "staged" in b else "-"
        body.append(
            [tpb, nb, pattern, direction, f"{k['num_copies']} x {size_text}", *cells]
            + [f"{float(k['ceiling_gbps']):.1f}", f"{float(k['ratio']):.3f}", staged]
        )
    columns = ["tpb", "blocks", "pattern", "dir", "copies x size", "kernel GB/s"]
    columns += ["memcpy_batch GB/s", "memcpy GB/s", "staged GB/s", "bulk copy GB/s"]
    columns += ["kernel / bulk", "staged / bulk"]
    return markdown(columns, body)


def paged_table(rows: list[dict]) -> str:
    columns = ["op", "layers x K,V", "pairs", "kernel GB/s", "ratio to copy"]
    columns += ["torch indexing GB/s", "plain copy GB/s", "planning (host)"]
    body = [
        [
            r["op"],
            f"{r['num_layers']} x 2",
            r["pairs"],
            f"{float(r['bandwidth_gbps']):.0f}",
            f"{float(r['ratio']):.3f}",
            f"{float(r['torch_indexing_gbps']):.0f}",
            f"{float(r['copy_gbps']):.0f}",
            f"{float(r['plan_us']):.0f} us",
        ]
        for r in rows
    ]
    return markdown(columns, body)


def transfers_table(rows: list[dict]) -> str:
    columns = ["tpb", "blocks", "direction", "pinned ids", "manager's path", "kernel GB/s"]
    columns += ["manager GB/s", "ratio"]
    columns += ["kernel wall GB/s", "manager wall GB/s", "wall ratio", "host us per call"]
    body = [
        [
            r["tokens_per_block"],
            r["num_blocks"],
            f"{r['direction']} ({r['pattern']})",
            r.get("pinned_ids", "consecutive"),
            r["strategy"],
            r["kernel_gbps"],
            r["manager_gbps"],
            r["ratio"],
            r["kernel_wall_gbps"],
            r["manager_wall_gbps"],
            r["wall_ratio"],
            f"{float(r['call_us']):.0f}",
        ]
        for r in rows
    ]
    return markdown(columns, body)


def disk_table(rows: list[dict]) -> str:
    columns = ["tpb", "blocks", "direction", "bytes", "O_DIRECT", "kvblocks GB/s", "dd GB/s"]
    columns.append("ratio")
    body = [
        [
            r["tokens_per_block"],
            r["num_blocks"],
            r["direction"],
            f"{int(r['total_bytes']) / 2**20:.0f} MiB",
            r["direct_io"],
            r["kvblocks_gbps"],
            r["dd_gbps"],
            r["ratio"],
        ]
        for r in rows
    ]
    return markdown(columns, body)


def remote_table(rows: list[dict]) -> str:
    columns = ["tpb", "blocks", "op", "route (strategy)", "bytes", "kvblocks GB/s"]
    columns += ["NIXL alone GB/s", "ratio", "local path GB/s"]
    body = [
        [
            r["tokens_per_block"],
            r["num_blocks"],
            f"{r['op']} ({r['pattern']})",
            f"{r['route']} ({r['strategy']})",
            f"{int(r['total_bytes']) / 2**20:.0f} MiB",
            r["nixl_gbps"],
            r["nixl_alone_gbps"],
            r["ratio"],
            r["local_gbps"],
        ]
        for r in rows
    ]
    return markdown(columns, body)


def sharing_table(rows: list[dict]) -> str:
    columns = [
        "tpb",
        "blocks",
        "bytes",
        "lookup from the peer ms",
        "its NIXL read ms",
        "lookup from local G2 ms",
        "NIXL alone ms",
        "offload to the peer: NIXL write ms",
        "NIXL alone write ms",
        "GB/s",
        "parts GB/s",
        "ratio",
    ]
    body = [
        [
            r["tokens_per_block"],
            r["num_blocks"],
            f"{int(r['total_bytes']) / 2**20:.0f} MiB",
            r["peer_lookup_ms"],
            r["peer_read_ms"],
            r["local_lookup_ms"],
            r["nixl_alone_ms"],
            r["peer_write_ms"],
            r["nixl_alone_write_ms"],
            r["sharing_gbps"],
            r["parts_gbps"],
            r["ratio"],
        ]
        for r in rows
    ]
    return markdown(columns, body)


def pool_table(rows: list[dict]) -> str:
    body = [
        [r["operation"], r["blocks"], r["median_us"], f"{int(r['blocks_per_second']):,}"]
        for r in rows
    ]
    return markdown(["operation", "blocks", "median us", "blocks per second"], body)


SECTIONS = [
    ("permute.csv", "Permutes", permute_table),
    ("kvbench.csv", "kvbench", kvbench_table),
    ("paged.csv", "copy_blocks / swap_blocks", paged_table),
    ("transfers.csv", "TransferManager: device <-> pinned", transfers_table),
    ("disk.csv", "TransferManager: pinned <-> disk", disk_table),
    ("remote.csv", "TransferManager: device <-> another worker (NIXL)", remote_table),
    ("sharing.csv", "BlockManager: prefix lookups served by another worker (G4)", sharing_table),
    ("pool.csv", "Block pool (CPU)", pool_table),
]

if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results")
    for name, title, table in SECTIONS:
        if (folder / name).exists():
            print(f"## {title}\n\n{table(read(folder / name))}\n")
