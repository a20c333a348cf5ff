"""A prefix hit copied back from G2 while the engine's forward pass runs: a lookup that waits
for its copies, then the forward pass, against one that returns at once and lets each layer
of the forward pass wait for its own layers only (``lookup(..., wait=False)``,
``hit.ready.wait_layer``).

One BlockManager per ``--groups`` value (``onboard_layer_groups``), by default of
Llama-3.1-8B's cache (32 layers, 8 KV heads of 128, bf16, 16 tokens per block: 2 MiB per
block). A prompt of ``--prompt-tokens`` tokens is computed once (random KV, registered,
offloaded to G2). The forward pass is stood in for by matrix products on the current stream,
the same number per layer, sized so that the whole pass takes about as long as the copy
(``--compute`` scales it). With ``--scatter`` the G2 pool hands its blocks out in a random
order (as a host pool does after some churn) and holds four times the prompt, so the
prompt's neighbouring blocks seldom sit side by side in G2 and the copy engine can seldom join
them into one copy. Each case is
repeated ``--repeats`` times with G1 emptied before,
so each lookup copies the whole prompt back from G2; medians of host wall time (from the
lookup's call to the end of the forward pass on the GPU) are reported:

- ``copy_ms``: the lookup alone (it waits); ``forward_ms``: the forward pass alone;
- ``return_ms``: how long the lookup call held the host;
- ``total_ms``: lookup and forward pass, ``vs_serial`` against ``copy_ms + forward_ms`` and
  ``vs_bound`` against ``max(copy_ms, forward_ms)`` (what a perfect overlap would take).

The first block's KV is checked after every case.

Usage: python bench/onboard.py [--prompt-tokens 16384] [--groups 1,4,8,32] [--scatter]
    > onboard.csv
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch

from kvblocks.benchmarks.timing import gpu_name
from kvblocks.pool import BlockManager, BlockManagerConfig, Tier

#: Rows and columns of the square matrices each product of the stand-in forward pass uses.
MATRIX = 4096


def median_ms(run: Callable[[], None], repeats: int) -> float:
    """The median wall time of ``run`` (which ends synchronized), after one warm-up run."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


class Case:
    """One manager with the prompt in G2, and the runs timed on it."""

    def __init__(self, config: BlockManagerConfig, tokens: list[int], scatter: bool) -> None:
        self.manager = BlockManager(config)
        self.tokens = tokens
        manager = self.manager
        if scatter:
            g2 = manager.pool(Tier.G2)
            ids = g2.allocate(g2.num_free)
            random.Random(0).shuffle(ids)
            g2.free(ids)
        ids = manager.allocate(len(tokens) // config.block_size)
        for t in manager.device_tensors:
            t.normal_()
        self.first = [t[ids[0]].clone() for t in manager.device_tensors]
        manager.register(ids, tokens)
        manager.free(ids)
        manager.flush()
        self.g1_blocks = manager.pool(Tier.G1).num_blocks

    def forget_g1(self) -> None:
        """Empty G1, so the next lookup copies the prompt back from G2."""
        self.manager.free(self.manager.allocate(self.g1_blocks))

    def check(self, block: int) -> None:
        for t, want in zip(self.manager.device_tensors, self.first, strict=True):
            if not torch.equal(t[block].view(torch.int16), want.view(torch.int16)):
                raise SystemExit("a block copied back from G2 does not hold its KV")

    def lookup(self, wait: bool, layer: Callable[[int], None] | None) -> float:
        """Look the prompt up and run ``layer`` for each layer (None: no forward pass);
        returns the seconds the lookup call took."""
        self.forget_g1()
        manager = self.manager
        torch.cuda.synchronize()
        start = time.perf_counter()
        hit = manager.lookup(self.tokens, wait=wait)
        returned = time.perf_counter() - start
        if layer is not None:
            for i in range(manager.config.num_layers):
                hit.ready.wait_layer(i)
                layer(i)
        torch.cuda.synchronize()
        self.check(hit.block_ids[0])
        manager.free(hit.block_ids)
        return returned

    def close(self) -> None:
        self.manager.close()


class Forward:
    """The stand-in forward pass: ``products`` matrix products per layer on the current
    stream."""

    def __init__(self) -> None:
        self.a = torch.randn(MATRIX, MATRIX, device="cuda", dtype=torch.bfloat16)
        self.b = torch.randn(MATRIX, MATRIX, device="cuda", dtype=torch.bfloat16)
        self.out = torch.empty_like(self.a)
        self.products = 1

    def layer(self, _: int) -> None:
        for _ in range(self.products):
            torch.mm(self.a, self.b, out=self.out)

    def run(self, layers: int) -> None:
        for i in range(layers):
            self.layer(i)
        torch.cuda.synchronize()


def measure(case: Case, forward: Forward, args: argparse.Namespace) -> list[dict]:
    """The rows of one manager: a lookup that waits and one that does not, each with the
    forward pass after it."""
    config = case.manager.config
    blocks = len(case.tokens) // config.block_size
    copy_ms = median_ms(lambda: case.lookup(True, None), args.repeats)
    forward.products = 1
    one = median_ms(lambda: forward.run(1), args.repeats)
    forward.products = max(1, round(args.compute * copy_ms / config.num_layers / one))
    forward_ms = median_ms(lambda: forward.run(config.num_layers), args.repeats)
    rows = []
    for mode, wait in (("wait, then forward", True), ("layer by layer", False)):
        returns: list[float] = []

        def run(wait: bool = wait, returns: list[float] = returns) -> None:
            returns.append(case.lookup(wait, forward.layer))

        total_ms = median_ms(run, args.repeats)
        rows.append(
            {
                "gpu": gpu_name(),
                "prompt_blocks": blocks,
                "gib": round(blocks * config.block_bytes / 2**30, 2),
                "groups": config.onboard_layer_groups,
                "g2": "scattered" if args.scatter else "consecutive",
                "mode": mode,
                "copy_ms": round(copy_ms, 2),
                "forward_ms": round(forward_ms, 2),
                "return_ms": round(statistics.median(returns) * 1e3, 3),
                "total_ms": round(total_ms, 2),
                "vs_serial": round(total_ms / (copy_ms + forward_ms), 3),
                "vs_bound": round(total_ms / max(copy_ms, forward_ms), 3),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--groups", default="1,4,8,32")
    parser.add_argument("--compute", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--scatter", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/onboard.py needs a CUDA GPU")
    blocks = args.prompt_tokens // args.block_size
    tokens = list(range(blocks * args.block_size))
    dims = dict(
        num_layers=args.layers,
        num_kv_heads=args.heads,
        head_dim=args.head_dim,
        block_size=args.block_size,
    )
    block_bytes = BlockManagerConfig(**dims, device_blocks=1).block_bytes
    forward = Forward()
    writer = None
    for groups in (int(g) for g in args.groups.split(",")):
        config = BlockManagerConfig(
            **dims,
            device_blocks=blocks + 1,
            enable_offload=True,
            host_cache_gb=((4 if args.scatter else 1) * blocks + 1) * block_bytes / 2**30,
            onboard_layer_groups=groups,
        )
        case = Case(config, tokens, args.scatter)
        try:
            rows = measure(case, forward, args)
        finally:
            case.close()
        if writer is None:
            writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
            writer.writeheader()
        writer.writerows(rows)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
