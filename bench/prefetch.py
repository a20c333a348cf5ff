"""What a G3 hit costs an engine's other requests: a scheduler that decodes a running request
step by step when a long prompt whose KV only G3 caches arrives.

The engine is ``examples/tiny_engine.py``'s, shaped by ``--model`` and ``--layers`` as in
``bench/ttft.py``. One request (``--decode-context`` tokens) decodes a token per step, each
step's token read back on the host as a sampler does. After ``BASE_STEPS`` steps a prompt of
``--prompt-tokens`` arrives whose blocks a new manager finds in G3 only (as after a restart),
and the scheduler serves it one of five ways:

- ``compute``: it computes the whole prompt at once (no cache), then goes back to decoding;
- ``lookup``: it looks the prompt up (the disk is read inside ``lookup``), computes its last
  block, then goes back to decoding;
- ``prefetch``: it calls ``manager.prefetch`` and goes on decoding; after each step it asks
  ``done()``, and once the prefix is in G2 it looks the prompt up with
  ``onboard_from={Tier.G2}``, computes its last block, and releases the prefetch;
- ``prefetch_overlap``: as ``prefetch``, but its lookup from G2 does not wait for the copies
  into G1 (``wait=False``): the scheduler goes on decoding until ``hit.ready.done()``, then
  computes the last block;
- ``split``: ``kvblocks.pool.read_split`` splits the prefix (at the prefill rate of the
  ``compute`` rows and the disk's rate of the ``lookup`` rows, in chunks of 64 blocks):
  ``prefetch(..., first_block=split.read_from)`` reads the rest while the scheduler computes
  the blocks before it one chunk between two decoding steps (chunked prefill), then goes on
  as ``prefetch_overlap`` does.

The prompt's first token is timed from its arrival until it is on the host, and the decoding
request's steps around it: ``stall_ms`` is the longest time between two of its tokens from the
arrival until the step after the prompt's first token, ``steps_during`` the steps it made
meanwhile, ``step_ms`` their median time and ``base_step_ms`` the median step before the
arrival. Each hit's prefix is checked against what computing the prompt wrote (every block
and layer, by a fingerprint of its 16-bit words).

Columns: ``gpu``, ``model``, ``layers``, ``prompt_tokens``, ``mode``, ``prefix_mib``,
``ttft_ms``, ``ttft_min_ms``, ``ttft_max_ms``, ``stall_ms``, ``stall_max_ms``,
``steps_during``, ``step_ms``, ``base_step_ms``, ``disk_gbps`` (medians over ``--repeats``
prompts after one to warm up, ``*_min``/``*_max`` their extremes; ``disk_gbps``: the rate of
the manager's reads from G3, as ``metrics.onboard_rate`` says).

Usage: python bench/prefetch.py [--model llama-3.1-8b] [--layers N] [--prompt-tokens 16384]
    [--repeats 5] [--decode-context 1024] [--offload-path DIR] > prefetch.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from ttft import (
    BLOCK_SIZE,
    SHAPES,
    SPLIT_CHUNK_BLOCKS,
    Fingerprints,
    build_model,
    check_hit,
    warm_gpu,
)

from kvblocks.benchmarks.timing import gpu_name
from kvblocks.pool import WITHOUT_DISK, BlockManager, Tier, read_split

MODES = ("compute", "lookup", "prefetch", "prefetch_overlap", "split")
#: Decoding steps timed before each prompt arrives.
BASE_STEPS = 20
#: Decoding steps after the prompt's first token.
AFTER_STEPS = 3
FIELDS = [
    "gpu",
    "model",
    "layers",
    "prompt_tokens",
    "mode",
    "prefix_mib",
    "ttft_ms",
    "ttft_min_ms",
    "ttft_max_ms",
    "stall_ms",
    "stall_max_ms",
    "steps_during",
    "step_ms",
    "base_step_ms",
    "disk_gbps",
]


class Decoder:
    """A running request that decodes one token per :meth:`step`, over the same
    ``context`` tokens each time it is :meth:`rewound` (its attention's cost stays put)."""

    def __init__(self, engine, manager: BlockManager, model, context: int, steps: int) -> None:
        self._model = model
        self._device = manager.device_tensors[0].device
        gen = torch.Generator().manual_seed(context)
        prompt = torch.randint(0, model.dims.vocab, (context,), generator=gen).tolist()
        hit = manager.lookup(prompt)
        self.blocks = manager.allocate(-(-(context + steps) // BLOCK_SIZE))
        self._kv = engine.PagedKv(manager, self.blocks, hit)
        self._context = context
        out = model.forward(torch.tensor(prompt, device=self._device), 0, self._kv)
        self._token = int(out[-1].argmax())
        self.rewind()

    def rewind(self) -> None:
        self._kv.start = self._context

    def step(self) -> float:
        """One token (on the host when this returns); returns the time it returned."""
        token = torch.tensor([self._token], device=self._device)
        out = self._model.forward(token, self._kv.start, self._kv)
        self._kv.start += 1
        self._token = int(out[-1].argmax())
        return time.perf_counter()


@dataclass(frozen=True)
class Rates:
    """What ``split`` splits by: the engine's prefill rate and the disk's read rate."""

    prefill_tokens_per_s: float
    disk_bytes_per_s: float


@dataclass(frozen=True)
class Served:
    """One prompt's arrival, as the decoding request saw it."""

    ttft_s: float
    stall_s: float
    steps_during: int
    step_s: float | None  # None: no step between the arrival and the prompt's computing
    base_step_s: float
    cached_blocks: int  # blocks of the prompt's prefix that were not computed


def serve(
    engine,
    manager: BlockManager,
    model,
    decoder: Decoder,
    prompt,
    mode: str,
    rates: Rates | None,
):
    """Decode ``BASE_STEPS`` steps, let ``prompt`` arrive and serve it in ``mode`` between
    steps, decode ``AFTER_STEPS`` more. Returns the prompt's Generation, the Served, and the
    first block read from disk."""
    decoder.rewind()
    done = [decoder.step() for _ in range(BASE_STEPS)]
    base = statistics.median(b - a for a, b in zip(done, done[1:], strict=False))
    arrival = time.perf_counter()
    prefix_blocks = (len(prompt) - 1) // BLOCK_SIZE
    read_from = 0
    if mode.startswith("prefetch") or mode == "split":
        if mode == "split":
            prefix = prompt[: prefix_blocks * BLOCK_SIZE]
            split = read_split(
                manager,
                prefix,
                rates.prefill_tokens_per_s,
                disk_bytes_per_s=rates.disk_bytes_per_s,
                chunk_blocks=SPLIT_CHUNK_BLOCKS,
            )
            read_from = split.read_from
        fetch = manager.prefetch(prompt, max_blocks=prefix_blocks, first_block=read_from)
        with fetch:
            if mode == "split":
                chunks = range(split.compute_from, split.read_from, SPLIT_CHUNK_BLOCKS)
                for first in chunks:
                    done.append(decoder.step())
                    end = min(first + SPLIT_CHUNK_BLOCKS, split.read_from) * BLOCK_SIZE
                    engine.generate(manager, model, prompt[:end], 1, onboard_from=WITHOUT_DISK)
            while not fetch.done():
                done.append(decoder.step())
            fetch.wait()
            hit = None
            if mode != "prefetch":
                hit = engine.lookup_prefix(manager, prompt, onboard_from={Tier.G2})
                while not hit.ready.done():
                    done.append(decoder.step())
            started = time.perf_counter()
            run = engine.generate(manager, model, prompt, 1, onboard_from={Tier.G2}, hit=hit)
    else:
        started = time.perf_counter()
        tiers = frozenset() if mode == "compute" else None
        run = engine.generate(manager, model, prompt, 1, onboard_from=tiers)
    first_token = started + run.first_token_s
    during = sum(t > arrival for t in done)
    done += [decoder.step() for _ in range(AFTER_STEPS)]
    gaps = [b - a for a, b in zip(done, done[1:], strict=False) if b > arrival]
    steps = [b - a for a, b in zip(done, done[1:], strict=False) if arrival < a and b < started]
    served = Served(
        ttft_s=first_token - arrival,
        stall_s=max(gaps[: during + 1]),
        steps_during=during,
        step_s=statistics.median(steps) if steps else None,
        base_step_s=base,
        cached_blocks=0 if mode == "compute" else prefix_blocks - read_from,
    )
    return run, served, read_from


def run_mode(engine, model, config, prompts, prints, mode: str, context: int, rates: Rates | None):
    """Serve every prompt in ``mode`` on a new manager on the G3 file (G1 and G2 empty).
    Returns the Served of the prompts after the first, and the disk's rate (GB/s)."""
    prefix_blocks = (len(prompts[0]) - 1) // BLOCK_SIZE
    served = []
    with BlockManager(config) as manager:
        decoder = Decoder(engine, manager, model, context, BASE_STEPS * 50)
        for i, prompt in enumerate(prompts):
            warm_gpu()
            run, timing, read_from = serve(engine, manager, model, decoder, prompt, mode, rates)
            if mode == "split":  # the computed blocks from G1, the read ones from G2
                if run.hit.num_tokens != prefix_blocks * BLOCK_SIZE:
                    raise RuntimeError(f"the split prefix came back in part: {run.hit.from_tier}")
                prints[i].check(manager, run.block_ids, "G3 (split)", first=read_from)
            elif mode != "compute":
                check_hit(run, Tier.G3 if mode == "lookup" else Tier.G2, prefix_blocks)
                prints[i].check(manager, run.block_ids, f"G3 ({mode})")
            if i:
                served.append(timing)
        rate = manager.metrics.onboard_rate(Tier.G3, Tier.G2)
        manager.free(decoder.blocks)
    return served, (rate or 0) / 1e9


def store_prompts(engine, model, config, prompts) -> list[Fingerprints]:
    """Compute every prompt once, so that G3 holds its blocks; returns their fingerprints."""
    prefix_blocks = (len(prompts[0]) - 1) // BLOCK_SIZE
    prints = []
    with BlockManager(config) as manager:
        for prompt in prompts:
            run = engine.generate(manager, model, prompt, 1)
            prints.append(Fingerprints(manager, run.block_ids, prefix_blocks))
        manager.flush()
    return prints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["small", *SHAPES], default="llama-3.1-8b")
    parser.add_argument("--layers", type=int, help="layers of the model to build (default all)")
    parser.add_argument("--prompt-tokens", type=int, default=16384, help="prompt length")
    parser.add_argument("--repeats", type=int, default=5, help="prompts timed per mode (5)")
    parser.add_argument(
        "--decode-context", type=int, default=1024, help="tokens the decoding request attends"
    )
    parser.add_argument("--offload-path", help="folder of the G3 file (default: a temporary one)")
    args = parser.parse_args(argv)
    length = args.prompt_tokens
    if length < 2 * BLOCK_SIZE or length % BLOCK_SIZE:
        parser.error(f"--prompt-tokens: must be a multiple of {BLOCK_SIZE}, >= {2 * BLOCK_SIZE}")
    if min(args.repeats, args.decode_context, args.layers or 1) < 1:
        parser.error("--repeats, --decode-context and --layers must be >= 1")

    engine, dims, model = build_model(args.model, args.layers)
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, dims.vocab, (length,), generator=gen).tolist()
        for _ in range(args.repeats + 1)
    ]
    blocks = length // BLOCK_SIZE
    decode_blocks = -(-(args.decode_context + BASE_STEPS * 50) // BLOCK_SIZE)
    out = csv.DictWriter(sys.stdout, FIELDS, lineterminator="\n")
    out.writeheader()
    with tempfile.TemporaryDirectory(dir=args.offload_path) as disk:
        config = engine.manager_config(
            dims,
            BLOCK_SIZE,
            2 * blocks + decode_blocks + 1,
            2 * blocks,
            len(prompts) * blocks,
            disk,
            layer_groups=4,
        )
        prints = store_prompts(engine, model, config, prompts)
        print(f"{len(prompts)} prompts of {length} tokens in G3", file=sys.stderr)
        prefill_tokens_per_s = disk_bytes_per_s = None
        for mode in MODES:
            rates = None
            if mode == "split":
                rates = Rates(prefill_tokens_per_s, disk_bytes_per_s)
            served, disk_gbps = run_mode(
                engine, model, config, prompts, prints, mode, args.decode_context, rates
            )
            print(f"  {mode}: served", file=sys.stderr)
            ttft = [s.ttft_s for s in served]
            if mode == "compute":  # the whole prompt computed right at its arrival
                prefill_tokens_per_s = length / statistics.median(ttft)
            elif mode == "lookup":
                disk_bytes_per_s = disk_gbps * 1e9
            stalls = [s.stall_s for s in served]
            steps = [s.step_s for s in served if s.step_s is not None]
            cached = statistics.median(s.cached_blocks for s in served)
            out.writerow(
                {
                    "gpu": gpu_name(),
                    "model": args.model,
                    "layers": dims.num_layers,
                    "prompt_tokens": length,
                    "mode": mode,
                    "prefix_mib": round(cached * config.block_bytes / 2**20, 1),
                    "ttft_ms": round(statistics.median(ttft) * 1e3, 2),
                    "ttft_min_ms": round(min(ttft) * 1e3, 2),
                    "ttft_max_ms": round(max(ttft) * 1e3, 2),
                    "stall_ms": round(statistics.median(stalls) * 1e3, 2),
                    "stall_max_ms": round(max(stalls) * 1e3, 2),
                    "steps_during": round(statistics.median(s.steps_during for s in served)),
                    "step_ms": round(statistics.median(steps) * 1e3, 3) if steps else "",
                    "base_step_ms": round(
                        statistics.median(s.base_step_s for s in served) * 1e3, 3
                    ),
                    "disk_gbps": f"{disk_gbps:.3g}" if mode != "compute" else "",
                }
            )
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
