"""Time to first token of a long prompt whose KV a BlockManager caches, against computing the
whole prompt.

The engine is ``examples/tiny_engine.py``'s (``generate``): a transformer with random bf16
weights whose attention reads and writes its paged KV cache, the manager's G1 (16 tokens per
block), shaped by ``--model``: ``llama-3.1-8b`` (32 layers, 32 query and 8 KV heads of 128,
width 4,096, SwiGLU MLP of 14,336, vocabulary 128,256) or ``llama-3.1-70b`` (80 layers, 64
query and 8 KV heads of 128, width 8,192, MLP of 28,672), of which ``--layers`` only (a 70B
model does not fit one GPU: with fewer layers, computing the prompt and moving its KV both
shrink in proportion, so their ratio is the whole model's).

For each prompt length, ``--repeats`` prompts of random tokens (after one more to warm up) are
each served six ways, timed from the ``lookup`` call until the first generated token is on
the host:

- ``recompute``: nothing cached, the whole prompt is computed (its blocks are then registered
  and offloaded to G2 and G3);
- ``G1``: the prompt's blocks are still in G1;
- ``G2``: G1 emptied first, the prefix comes back from pinned host memory (``lookup(...,
  wait=False)``, 4 layer groups, each layer waited for on the stream before attention reads
  it);
- ``G3``: a new BlockManager on the same G3 file, so G1 and G2 are empty as after a restart;
  the prefix is read from disk (O_DIRECT, checksummed) through G2;
- ``G3 or compute``: as ``G3``, on a third manager, but the engine lets
  ``kvblocks.pool.skip_slow_reads`` choose between reading the prefix and computing it, by the
  disk's rate that manager measured (its warm-up prompt is read from G3 to measure it) and
  the prefill rate of this length's ``recompute`` runs;
- ``G3 split``: as ``G3 or compute``, but the engine computes the prefix's first blocks while
  the manager reads the rest from disk, split where ``kvblocks.pool.read_split`` says (in
  chunks of ``SPLIT_CHUNK_BLOCKS``; before the manager's first read, at the rate the ``G3``
  runs measured): ``prefetch(..., first_block=split.read_from)``, the blocks before it
  computed meanwhile (and registered), then the prompt looked up with
  ``onboard_from={Tier.G2}`` (the computed blocks from G1, the read ones from G2) and its last
  block computed. ``cached_tokens`` counts the tokens read only. (The engine's first forward
  pass of a new length costs up to seconds more than the next: the chunks keep the lengths
  few, and the untimed first prompt splits as the others do.)

With ``--peer`` (NIXL, UCX), four more: another worker in this process computes every prompt
and serves them from its G2 (``serve``); a worker with nothing cached and no disk follows its
news (``add_peer(..., news=True)``) and serves each prompt again:

- ``G4``: the prefix read from the peer into G2 inside ``lookup``, then copied into G1;
- ``G4 split``: on a third such worker, as ``G3 split``, the prefix split between computing
  and reading from the peer (at the rate the ``G4`` runs measured);
- ``G3+G4``: a worker with a disk computes each prompt's first half (its own G3 file, so
  after a restart only G3 has it), then follows the peer's news and serves each prompt: its
  lookup reads the first half from its disk and the rest from the peer;
- ``G3+G4 split``: as ``G3+G4`` after another restart, the prefix split between computing
  and reading, the disk's blocks and the peer's read at once (``prefetch``).

With a hit, the prompt's last block (16 tokens) is computed: its last token's logits give the
first answer token. After every hit, the K and V of every block of the prefix, every layer,
are checked against what the recompute wrote, by a fingerprint of their 16-bit words (of a
split, the blocks read).

Columns: ``prompt_tokens``, ``source``, ``cached_tokens`` (median), ``prefix_mib`` (the KV
the hit brought back), ``ttft_ms`` (median), ``ttft_min_ms``, ``ttft_max_ms``, ``lookup_ms``
(median host time of the ``lookup`` call, within ``ttft_ms``), ``speedup`` (the recompute's
median over this row's), ``disk_gbps`` and ``peer_gbps`` (the rate of the manager's reads
from G3 and from the peer, as ``metrics.onboard_rate`` says; empty where it read none).

Usage: python bench/ttft.py [--model llama-3.1-8b] [--layers N] [--prompt-tokens 4096,16384]
    [--repeats 7] [--offload-path DIR] [--peer] > ttft.csv
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib.util
import pathlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import torch

from kvblocks.benchmarks.peers import wait_for_news
from kvblocks.benchmarks.timing import gpu_name
from kvblocks.pool import BlockManager, Tier, read_split, skip_slow_reads
from kvblocks.remote import nixl_available

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "tiny_engine.py"
BLOCK_SIZE = 16
#: The splits compute whole chunks of this many blocks (1,024 tokens).
SPLIT_CHUNK_BLOCKS = 64
#: Where the ``--peer`` worker serves its G2.
PEER_ENDPOINT = "tcp://127.0.0.1:*"
FIELDS = [
    "gpu",
    "model",
    "layers",
    "prompt_tokens",
    "source",
    "cached_tokens",
    "prefix_mib",
    "ttft_ms",
    "ttft_min_ms",
    "ttft_max_ms",
    "lookup_ms",
    "speedup",
    "disk_gbps",
    "peer_gbps",
]


def load_engine():
    """``examples/tiny_engine.py`` as a module."""
    spec = importlib.util.spec_from_file_location("tiny_engine", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


#: The shapes ``--model`` knows besides the example's small default (for checks on a CPU).
SHAPES = {
    "llama-3.1-8b": dict(num_layers=32, num_heads=32, mlp_width=14336),
    "llama-3.1-70b": dict(num_layers=80, num_heads=64, mlp_width=28672),
}


def model_dims(engine, model: str, layers: int | None):
    """The example's ModelDims of ``model`` in bf16, with ``layers`` layers where given."""
    dims = engine.ModelDims(dtype=torch.bfloat16)
    if model != "small":
        shape = SHAPES[model]
        dims = replace(
            dims,
            num_layers=shape["num_layers"],
            num_heads=shape["num_heads"],
            num_kv_heads=8,
            head_dim=128,
            vocab=128256,
            mlp_width=shape["mlp_width"],
        )
    return dims if layers is None else replace(dims, num_layers=layers)


def build_model(name: str, layers: int | None):
    """The example's module, the dims of model ``name`` (``layers`` of them where given) and
    its Transformer, on the GPU where there is one."""
    engine = load_engine()
    dims = model_dims(engine, name, layers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return engine, dims, engine.Transformer(dims, device, seed=1)


@dataclass(frozen=True)
class Served:
    """What the CSV needs of one request's run (``Generation``), without its logits (a
    recompute's are ``[prompt tokens, vocabulary]`` floats: gigabytes at 16k tokens)."""

    first_token_s: float
    lookup_s: float
    cached_tokens: int

    @classmethod
    def of(cls, run) -> Served:
        return cls(run.first_token_s, run.lookup_s, run.hit.num_tokens)


@dataclass(frozen=True)
class ReadRates:
    """GB/s of a manager's reads into G2 from its disk and from peers; None where it read
    none."""

    disk: float | None
    peer: float | None

    @classmethod
    def of(cls, manager: BlockManager) -> ReadRates:
        def gbps(tier: Tier) -> float | None:
            rate = manager.metrics.onboard_rate(tier, Tier.G2)
            return None if rate is None else rate / 1e9

        return cls(gbps(Tier.G3), gbps(Tier.G4))


class Fingerprints:
    """A fingerprint of every block of a prompt's prefix, each layer's K and V apart, as the
    recompute wrote them (a weighted sum of the block's 16-bit words, on the cache's device),
    to compare a hit's blocks with."""

    def __init__(self, manager: BlockManager, block_ids: list[int], prefix_blocks: int) -> None:
        self.prefix_blocks = prefix_blocks
        self.prints = self._read(manager, block_ids)

    def _read(self, manager: BlockManager, block_ids: list[int]) -> torch.Tensor:
        """``[2 * nl, prefix_blocks]`` int64: the fingerprint of each (layer, K or V) of each
        block of the prefix."""
        device = manager.device_tensors[0].device
        ids = torch.tensor(block_ids[: self.prefix_blocks], device=device)
        rows = []
        for layer in range(manager.config.num_layers):
            for outer in (0, 1):
                words = manager.region_view(layer, outer)[ids].reshape(len(ids), -1)
                words = words.view(torch.int16).to(torch.int64)
                weights = torch.arange(1, words.shape[1] + 1, device=device) * 40_503 % 65_521
                rows.append((words * weights).sum(dim=1))
        return torch.stack(rows)

    def joined(self, later: Fingerprints) -> Fingerprints:
        """These fingerprints for their blocks, ``later``'s for the blocks after them."""
        joined = copy.copy(later)
        joined.prints = torch.cat([self.prints, later.prints[:, self.prefix_blocks :]], dim=1)
        return joined

    def check(
        self, manager: BlockManager, block_ids: list[int], source: str, first: int = 0
    ) -> None:
        """Raise unless every block of the prefix from position ``first`` on is as computed."""
        wrong = (self._read(manager, block_ids) != self.prints).any(dim=0)[first:]
        if wrong.any():
            at = first + int(wrong.nonzero()[0])
            raise RuntimeError(
                f"{int(wrong.sum())} block(s) that came back from {source} differ, the first at"
                f" position {at}: no figures"
            )


def warm_gpu(seconds: float = 0.2) -> None:
    """Keep the GPU busy for ``seconds`` so that its clocks are up when a timed request
    starts (after a pause it idles at a fraction of its clock, and a short request would be
    timed at that pace)."""
    if not torch.cuda.is_available():
        return
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def time_prompts(
    engine, model, config, prompts: list[list[int]], peer: bool
) -> tuple[dict[str, list[Served]], dict[str, ReadRates]]:
    """The runs of each prompt, per source, the first prompt's not kept (the GPU is kept busy
    for a moment before each), and the read rates of each source that read."""
    sources = ("recompute", "G1", "G2", "G3", "G3 or compute", "G3 split")
    runs: dict[str, list[Served]] = {source: [] for source in sources}
    rates: dict[str, ReadRates] = {}
    prefix_blocks = (len(prompts[0]) - 1) // BLOCK_SIZE
    prints = []
    with BlockManager(config) as manager:
        for i, prompt in enumerate(prompts):
            warm_gpu()
            run = engine.generate(manager, model, prompt, 1)
            if run.hit.num_tokens:
                raise RuntimeError("a prompt of fresh random tokens hit the cache")
            prints.append(Fingerprints(manager, run.block_ids, prefix_blocks))
            manager.flush()  # in G2 and G3 now
            for source in ("G1", "G2"):
                if source == "G2":
                    manager.free(manager.allocate(config.device_blocks))  # G1 forgets it
                warm_gpu()
                hit = engine.generate(manager, model, prompt, 1)
                check_hit(hit, Tier[source], prefix_blocks)
                prints[-1].check(manager, hit.block_ids, source)
                if i:
                    runs[source].append(Served.of(hit))
            if i:
                runs["recompute"].append(Served.of(run))
            print(f"  prompt {i}: computed and hit in G1, G2", file=sys.stderr)
    runs["G3"], rates["G3"] = serve_from_disk(engine, model, config, prompts, prints)
    recompute_s = statistics.median(r.first_token_s for r in runs["recompute"])
    prefill_rate = len(prompts[0]) / recompute_s
    runs["G3 or compute"], rates["G3 or compute"] = serve_from_disk(
        engine, model, config, prompts, prints, prefill_rate
    )
    with BlockManager(config) as manager:  # on the same G3 file: G1 and G2 empty
        disk_rate = rates["G3"].disk * 1e9
        runs["G3 split"] = serve_split(
            engine, model, manager, prompts, prints, prefill_rate, disk_bytes_per_s=disk_rate
        )
        rates["G3 split"] = ReadRates.of(manager)
    if peer:
        for source, (source_runs, source_rates) in serve_from_peer(
            engine, model, config, prompts, prefill_rate, disk_rate
        ).items():
            runs[source], rates[source] = source_runs, source_rates
    return runs, rates


def serve_split(
    engine,
    model,
    manager: BlockManager,
    prompts: list[list[int]],
    prints: list[Fingerprints],
    prefill_tokens_per_s: float,
    **rates: float,
) -> list[Served]:
    """Serve each prompt with ``manager``, its prefix split between computing and reading as
    ``read_split`` says (at ``rates``, its ``disk_bytes_per_s`` or ``peer_bytes_per_s``,
    before the manager's first read). Returns the runs after the first (``cached_tokens``:
    those read)."""
    prefix_blocks = (len(prompts[0]) - 1) // BLOCK_SIZE
    runs = []
    for i, prompt in enumerate(prompts):
        warm_gpu()
        start = time.perf_counter()
        prefix = prompt[: prefix_blocks * BLOCK_SIZE]
        split = read_split(
            manager, prefix, prefill_tokens_per_s, chunk_blocks=SPLIT_CHUNK_BLOCKS, **rates
        )
        computed = split.read_from - split.compute_from
        with manager.prefetch(prefix, first_block=split.read_from) as fetch:
            if computed:
                head = prompt[: split.read_from * BLOCK_SIZE]
                engine.generate(manager, model, head, 1, onboard_from={Tier.G2})
            head_end = time.perf_counter()
            fetch.wait()
            called = time.perf_counter()
            run = engine.generate(manager, model, prompt, 1, onboard_from={Tier.G2})
        print(
            f"  prompt {i}: split {split.compute_from}:{split.read_from}:{split.end}"
            f" (estimated {split.compute_s * 1e3:.0f} ms computing,"
            f" {(split.read_s or 0) * 1e3:.0f} ms reading); head computed after"
            f" {(head_end - start) * 1e3:.0f} ms, the rest read after"
            f" {(called - start) * 1e3:.0f} ms",
            file=sys.stderr,
        )
        if run.hit.num_tokens != prefix_blocks * BLOCK_SIZE:
            raise RuntimeError(f"the split prefix came back in part: {run.hit.from_tier}")
        prints[i].check(manager, run.block_ids, "a split", first=split.read_from)
        if i:
            first_token_s = called + run.first_token_s - start
            cached = (prefix_blocks - computed) * BLOCK_SIZE
            runs.append(Served(first_token_s, run.lookup_s, cached))
    return runs


def serve_from_peer(
    engine,
    model,
    config,
    prompts: list[list[int]],
    prefill_tokens_per_s: float,
    disk_bytes_per_s: float,
) -> dict[str, tuple[list[Served], ReadRates]]:
    """Serve each prompt from a peer: another worker computes them all and serves its G2;
    workers with nothing cached and no disk (``config`` otherwise) follow its news and look
    each prompt up (``G4``), then on a new one split it (``G4 split``); workers whose own
    disk caches each prompt's first half look it up (``G3+G4``) and split it (``G3+G4
    split``). Returns, per source, the runs after the first and the manager's read rates."""
    prefix_blocks = (len(prompts[0]) - 1) // BLOCK_SIZE
    half = prefix_blocks // 2
    g2_gb = len(prompts) * (prefix_blocks + 1) * config.block_bytes / 2**30
    no_disk = replace(config, nixl_backend="UCX", disk_cache_gb=0.0)
    served: dict[str, tuple[list[Served], ReadRates]] = {}
    with (
        BlockManager(replace(no_disk, host_cache_gb=g2_gb)) as there,
        tempfile.TemporaryDirectory(dir=config.offload_path) as folder,
    ):
        prints = []
        for prompt in prompts:
            run = engine.generate(there, model, prompt, 1)
            prints.append(Fingerprints(there, run.block_ids, prefix_blocks))
        there.flush()
        endpoint = there.serve(PEER_ENDPOINT)

        def follower(worker_config) -> BlockManager:
            """A worker following the peer's news, once it has heard of every prompt."""
            manager = BlockManager(worker_config)
            manager.add_peer(endpoint, news=True)
            for prompt in prompts:
                prefix = prompt[: prefix_blocks * BLOCK_SIZE]
                wait_for_news(manager, endpoint, prefix, prefix_blocks)
            return manager

        def look_up(manager: BlockManager, source: str, expected: dict[Tier, int]) -> None:
            runs = []
            for i, prompt in enumerate(prompts):
                warm_gpu()
                run = engine.generate(manager, model, prompt, 1)
                if {t: n for t, n in run.hit.from_tier.items() if n} != expected:
                    raise RuntimeError(f"expected {expected}, got {dict(run.hit.from_tier)}")
                prints[i].check(manager, run.block_ids, source)
                if i:
                    runs.append(Served.of(run))
            served[source] = (runs, ReadRates.of(manager))

        def split(manager: BlockManager, source: str, **rates: float) -> None:
            runs = serve_split(
                engine, model, manager, prompts, prints, prefill_tokens_per_s, **rates
            )
            served[source] = (runs, ReadRates.of(manager))

        with follower(no_disk) as manager:
            look_up(manager, "G4", {Tier.G4: prefix_blocks})
        peer_rate = served["G4"][1].peer * 1e9
        with follower(no_disk) as manager:
            split(manager, "G4 split", peer_bytes_per_s=peer_rate)
        print("  every prompt hit at the peer, and split", file=sys.stderr)

        with_disk = replace(config, nixl_backend="UCX", offload_path=folder)
        with BlockManager(with_disk) as writer:  # each prompt's first half in its G3
            for i, prompt in enumerate(prompts):
                run = engine.generate(writer, model, prompt[: half * BLOCK_SIZE], 1)
                prints[i] = Fingerprints(writer, run.block_ids, half).joined(prints[i])
            writer.flush()
        with follower(with_disk) as manager:
            look_up(manager, "G3+G4", {Tier.G3: half, Tier.G4: prefix_blocks - half})
        with follower(with_disk) as manager:
            rates = dict(disk_bytes_per_s=disk_bytes_per_s, peer_bytes_per_s=peer_rate)
            split(manager, "G3+G4 split", **rates)
    return served


def serve_from_disk(
    engine,
    model,
    config,
    prompts: list[list[int]],
    prints: list[Fingerprints],
    prefill_tokens_per_s: float | None = None,
) -> tuple[list[Served], ReadRates]:
    """Serve each prompt again from a new manager on the same G3 file (G1 and G2 empty, as
    after a restart): from G3, or with ``prefill_tokens_per_s``, as ``skip_slow_reads``
    chooses. Returns the runs after the first, and the manager's read rates."""
    prefix_blocks = (len(prompts[0]) - 1) // BLOCK_SIZE
    runs = []
    with BlockManager(config) as manager:
        for i, prompt in enumerate(prompts):
            warm_gpu()
            tiers = None
            if prefill_tokens_per_s is not None:
                tiers = skip_slow_reads(manager, prompt, prefill_tokens_per_s)
            run = engine.generate(manager, model, prompt, 1, onboard_from=tiers)
            if prefill_tokens_per_s is None or run.hit.num_tokens:
                check_hit(run, Tier.G3, prefix_blocks)
                prints[i].check(manager, run.block_ids, "G3")
            if i:
                runs.append(Served.of(run))
        return runs, ReadRates.of(manager)


def check_hit(run, tier: Tier, prefix_blocks: int) -> None:
    if run.hit.from_tier.get(tier, 0) != prefix_blocks:
        raise RuntimeError(
            f"expected {prefix_blocks} blocks from {tier.name}, got {dict(run.hit.from_tier)}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["small", *SHAPES], default="llama-3.1-8b")
    parser.add_argument("--layers", type=int, help="layers of the model to build (default all)")
    parser.add_argument("--prompt-tokens", default="4096,16384", help="prompt lengths")
    parser.add_argument("--repeats", type=int, default=7, help="prompts timed per length (7)")
    parser.add_argument("--offload-path", help="folder of the G3 file (default: a temporary one)")
    parser.add_argument(
        "--peer", action="store_true", help="also serve each prompt from a peer (NIXL, UCX)"
    )
    args = parser.parse_args(argv)
    try:
        lengths = [int(n) for n in args.prompt_tokens.split(",")]
    except ValueError:
        parser.error(
            f"--prompt-tokens: expected ints separated by commas, got {args.prompt_tokens!r}"
        )
    if any(n < 2 * BLOCK_SIZE or n % BLOCK_SIZE for n in lengths):
        parser.error(
            f"--prompt-tokens: each must be a multiple of {BLOCK_SIZE}, >= {2 * BLOCK_SIZE}"
        )
    if args.repeats < 1 or (args.layers is not None and args.layers < 1):
        parser.error("--repeats and --layers must be >= 1")
    if args.peer and not nixl_available():
        parser.error("--peer reads through NIXL, which is not installed here (pip install nixl)")

    engine, dims, model = build_model(args.model, args.layers)
    gen = torch.Generator().manual_seed(0)
    out = csv.DictWriter(sys.stdout, FIELDS, lineterminator="\n")
    out.writeheader()
    for length in lengths:
        print(f"{length} tokens", file=sys.stderr)
        blocks = length // BLOCK_SIZE
        prompts = [
            torch.randint(0, dims.vocab, (length,), generator=gen).tolist()
            for _ in range(args.repeats + 1)
        ]
        with tempfile.TemporaryDirectory(dir=args.offload_path) as disk:
            g3_blocks = len(prompts) * blocks
            config = engine.manager_config(
                dims, BLOCK_SIZE, 2 * blocks + 1, 2 * blocks, g3_blocks, disk, layer_groups=4
            )
            runs, rates = time_prompts(engine, model, config, prompts, args.peer)
        recompute = statistics.median(r.first_token_s for r in runs["recompute"])
        for source, source_runs in runs.items():
            cached = round(statistics.median(r.cached_tokens for r in source_runs))
            seconds = [r.first_token_s for r in source_runs]
            median = statistics.median(seconds)
            read = rates.get(source, ReadRates(None, None))
            out.writerow(
                {
                    "gpu": gpu_name(),
                    "model": args.model,
                    "layers": dims.num_layers,
                    "prompt_tokens": length,
                    "source": source,
                    "cached_tokens": cached,
                    "prefix_mib": round(cached // BLOCK_SIZE * config.block_bytes / 2**20, 1),
                    "ttft_ms": round(median * 1e3, 2),
                    "ttft_min_ms": round(min(seconds) * 1e3, 2),
                    "ttft_max_ms": round(max(seconds) * 1e3, 2),
                    "lookup_ms": round(statistics.median(r.lookup_s for r in source_runs) * 1e3, 2),
                    "speedup": round(recompute / median, 2),
                    "disk_gbps": "" if read.disk is None else f"{read.disk:.3g}",
                    "peer_gbps": "" if read.peer is None else f"{read.peer:.3g}",
                }
            )
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
