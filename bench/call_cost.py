"""Host time of one ``TransferManager.execute_transfer`` call: what the engine's thread pays
to start a transfer, apart from the transfer itself.

Llama-3.1-70B blocks (bf16, 16 tokens per block, 5 MiB each) move between a layer-separate
device layout and a fully contiguous pinned one (h2d fc_to_lw, d2h lw_to_fc), two fully
contiguous ones (h2d fc_to_fc) and two device layouts (d2d lw_to_fc), 1, 8 and 128 blocks a
call. Each call is timed alone (median of 200 calls, 40 at 128 blocks) and waited for before
the next.

Several source trees can be compared (``--src`` once per tree, e.g. a git worktree's ``src``
of an older commit): each round runs every tree in a fresh process, in turn (the order
reversed every other round), so that the machine's changes of speed during the run fall on
all of them alike. ``call_us`` is the median over rounds; ``ratio`` is the median over rounds
of the tree's time over the first tree's in the same round (host times on a shared virtual
machine drift by a fifth or more between processes: compare trees only this way).

Usage: python bench/call_cost.py [--rounds 6] [--src DIR ...] > call-cost.csv
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = ("h2d fc_to_lw", "d2h lw_to_fc", "h2d fc_to_fc", "d2d lw_to_fc")
BLOCKS = (1, 8, 128)


def measure() -> list[dict]:
    """One process's rows: the median host time per call of each case."""
    import torch

    from kvblocks.layout import LayoutConfig
    from kvblocks.models import lookup_model
    from kvblocks.storage import PhysicalLayout
    from kvblocks.transfer import TransferManager

    config = LayoutConfig.from_dims(lookup_model("llama-3.1-70b").dims(16), max(BLOCKS))
    rows = []
    with TransferManager.builder().cuda_device_id(0).build() as manager:

        def register(builder):
            return manager.register_layout(builder.build())

        layout = PhysicalLayout.builder
        layer_separate = register(layout(config).layer_separate().allocate_device(0))
        contiguous = register(layout(config).fully_contiguous().allocate_device(0))
        pinned = register(layout(config).fully_contiguous().allocate_pinned())
        pairs = {
            "h2d fc_to_lw": (pinned, layer_separate),
            "d2h lw_to_fc": (layer_separate, pinned),
            "h2d fc_to_fc": (pinned, contiguous),
            "d2d lw_to_fc": (layer_separate, contiguous),
        }
        for case in CASES:
            src, dst = pairs[case]
            for blocks in BLOCKS:
                ids = list(range(blocks))
                for _ in range(10):
                    manager.execute_transfer(src, ids, dst, ids).wait()
                times = []
                for _ in range(200 if blocks < 128 else 40):
                    start = time.perf_counter()
                    done = manager.execute_transfer(src, ids, dst, ids)
                    times.append((time.perf_counter() - start) * 1e6)
                    done.wait()
                strategy = manager.strategy(src, dst, num_blocks=blocks).value
                rows.append(
                    {
                        "case": case,
                        "blocks": blocks,
                        "strategy": strategy,
                        "call_us": statistics.median(times),
                    }
                )
        rows.append({"gpu": torch.cuda.get_device_name(0)})
    return rows


def run_tree(src: str | None) -> list[dict]:
    """:func:`measure` in a fresh process importing kvblocks from ``src`` (default: as
    installed)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__, "--child"], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"call_cost: the run of {src or 'kvblocks'} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="runs of every tree (default 6)")
    parser.add_argument("--src", action="append", help="a tree holding the kvblocks package")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure()))
        return
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    trees = args.src or [None]
    medians: dict[tuple, list[float]] = {}
    strategies: dict[tuple, str] = {}
    gpu = ""
    for round_ in range(args.rounds):
        order = list(enumerate(trees))
        for i, tree in order if round_ % 2 == 0 else order[::-1]:
            print(f"[round {round_ + 1}/{args.rounds}] {tree or 'kvblocks'}", file=sys.stderr)
            *rows, device = run_tree(tree)
            gpu = device["gpu"]
            for row in rows:
                key = (i, row["case"], row["blocks"])
                medians.setdefault(key, []).append(row["call_us"])
                strategies[key] = row["strategy"]
    print(f"# {gpu}; median over {args.rounds} rounds of each case's median call")
    print("tree,case,blocks,strategy,call_us,ratio")
    for i, tree in enumerate(trees):
        for case in CASES:
            for blocks in BLOCKS:
                mine, first = medians[(i, case, blocks)], medians[(0, case, blocks)]
                ratio = statistics.median(a / b for a, b in zip(mine, first, strict=True))
                print(
                    f"{tree or 'kvblocks'},{case},{blocks},{strategies[(i, case, blocks)]},"
                    f"{statistics.median(mine):.1f},{ratio:.3f}"
                )


if __name__ == "__main__":
    main()
