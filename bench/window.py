"""What a lookup of a long prompt costs when its blocks come back from G2: the layers of a
sliding window (only the window's blocks are copied) beside full attention (every block).

One BlockManager per kind, of the same block shape (by default 8 layers of a Gemma-3-27B-like
cache: 16 KV heads of 128, bf16, 16 tokens per block, 1 MiB per block) and a window of 1,024
tokens. A prompt of ``--prompt-tokens`` tokens is computed once (random KV written into G1,
registered, offloaded to G2); then, ``--repeats`` times, G1 is emptied and the prompt looked
up again, so each lookup copies its hit back from G2. The median wall time of ``lookup`` is
reported with the blocks it held and copied, the GB/s that makes, and the window's time
against full attention's.

Usage: python bench/window.py [--prompt-tokens 32768] [--window 1024] [--repeats 20] > window.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time

import torch

from kvblocks.benchmarks.timing import gpu_name
from kvblocks.pool import BlockManager, BlockManagerConfig, Tier


def measure(window: int | None, args: argparse.Namespace) -> dict:
    """One kind's row: the median lookup time of the prompt with G1 emptied before each."""
    blocks = args.prompt_tokens // args.block_size
    probe = BlockManagerConfig(
        num_layers=args.layers,
        num_kv_heads=args.heads,
        head_dim=args.head_dim,
        block_size=args.block_size,
        device_blocks=1,
    )
    gib = (blocks + 1) * probe.block_bytes / 2**30
    config = BlockManagerConfig(
        num_layers=args.layers,
        num_kv_heads=args.heads,
        head_dim=args.head_dim,
        block_size=args.block_size,
        device_blocks=blocks + 1,
        enable_offload=True,
        host_cache_gb=gib,
        sliding_window=window,
    )
    tokens = list(range(blocks * args.block_size))
    with BlockManager(config) as manager:
        ids = manager.allocate(blocks)
        for t in manager.device_tensors:
            t.normal_()
        manager.register(ids, tokens)
        manager.free(ids)
        manager.flush()
        g1 = manager.pool(Tier.G1).num_blocks
        times, hit = [], None
        for _ in range(args.repeats + 1):
            manager.free(manager.allocate(g1))  # G1 forgets the prompt: G2 alone has it
            start = time.perf_counter()
            hit = manager.lookup(tokens)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            manager.free(hit.block_ids)
        seconds = statistics.median(times[1:])
        copied = hit.from_tier.get(Tier.G2, 0)
        return {
            "gpu": gpu_name(),
            "attention": "full" if window is None else f"window {window}",
            "prompt_blocks": blocks,
            "held_blocks": len(hit.block_ids),
            "skipped_blocks": hit.skipped,
            "copied_blocks": copied,
            "lookup_ms": round(seconds * 1e3, 3),
            "copied_gbps": round(copied * config.block_bytes / seconds / 1e9, 2),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=32768)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rows = [measure(None, args), measure(args.window, args)]
    rows[0]["vs_full"], rows[1]["vs_full"] = (
        1.0,
        round(rows[1]["lookup_ms"] / rows[0]["lookup_ms"], 4),
    )
    out = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
    out.writeheader()
    out.writerows(rows)


if __name__ == "__main__":
    main()
