"""The demo: a multi-turn chat workload replayed through a BlockManager whose G1 overflows.

Conversations share a few system prompts; each turn sends the whole history plus a new user
message, and the reply joins the history. Every request looks up its prompt's cached prefix
(onboarding it from G2 or G3), "computes" the KV of the rest by writing a pattern derived from
each block's sequence hash, and registers the new full blocks. Because the pattern follows the
hash, every block a lookup returns is checked against what was computed for it.

With several workers (BlockManagers that are each other's peers), request ``i`` goes to worker
``i mod n``, as a router that knows nothing of caches would send it: a conversation's earlier
turns are then on another worker, and come back as G4 hits. A :class:`PrefixRouter` sends each
request to the worker that caches most of its prompt instead, as the workers' KV events told a
:class:`~kvblocks.pool.KvIndex`.
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from kvblocks.benchmarks.plot import pyplot
from kvblocks.checks import positive_int
from kvblocks.errors import InvalidArgumentError, KvBlocksError
from kvblocks.pool import BlockManager, KvIndex, PrefixHit, Tier, sequence_hashes

#: Token ids are drawn from [0, VOCAB).
VOCAB = 32_000


@dataclass(frozen=True)
class ChatWorkload:
    """A seeded multi-turn chat workload.

    Attributes:
        conversations: conversations, interleaved at random.
        turns: requests per conversation.
        system_prompts: distinct system prompts the conversations share.
        system_tokens: tokens of each system prompt.
        user_tokens: (min, max) tokens of a user message.
        reply_tokens: (min, max) tokens of a reply.
        seed: the random seed; the same seed gives the same workload.
    """

    conversations: int = 24
    turns: int = 5
    system_prompts: int = 4
    system_tokens: int = 512
    user_tokens: tuple[int, int] = (32, 128)
    reply_tokens: tuple[int, int] = (64, 192)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("conversations", "turns", "system_prompts", "system_tokens"):
            positive_int(getattr(self, name), name)
        for name in ("user_tokens", "reply_tokens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise InvalidArgumentError(name, f"must be 1 <= min <= max, got {(low, high)}")

    def requests(self) -> list[ChatTurn]:
        """Every turn of every conversation, in the order they arrive."""
        rng = random.Random(self.seed)
        systems = [_tokens(rng, self.system_tokens) for _ in range(self.system_prompts)]
        system_of = [rng.randrange(self.system_prompts) for _ in range(self.conversations)]
        order = [c for c in range(self.conversations) for _ in range(self.turns)]
        rng.shuffle(order)
        turn_of: Counter[int] = Counter()
        turns = []
        for c in order:
            turns.append(
                ChatTurn(
                    conversation=c,
                    turn=turn_of[c],
                    system=systems[system_of[c]] if turn_of[c] == 0 else [],
                    user=_tokens(rng, rng.randint(*self.user_tokens)),
                    reply=_tokens(rng, rng.randint(*self.reply_tokens)),
                )
            )
            turn_of[c] += 1
        return turns

    def max_tokens(self) -> int:
        """The most tokens one conversation can reach."""
        return self.system_tokens + self.turns * (self.user_tokens[1] + self.reply_tokens[1])


@dataclass(frozen=True)
class ChatTurn:
    """One request: its conversation, turn number, and the tokens it adds to the history."""

    conversation: int
    turn: int
    system: list[int]
    user: list[int]
    reply: list[int]


@dataclass(frozen=True)
class Sample:
    """The state after one request: cumulative hits and tier occupancy (cached / total)."""

    request: int
    looked_up: int
    hits: dict[str, int]
    occupancy: dict[str, float]


@dataclass(frozen=True)
class Moved:
    """Blocks copied one way between two tiers, and the seconds those transfers took."""

    kind: str  # "offload" (down a tier) or "onboard" (up, on a hit)
    src: str
    dst: str
    blocks: int
    bytes: int
    seconds: float


@dataclass
class DemoResult:
    """What a demo run did."""

    requests: int = 0
    prompt_tokens: int = 0
    saved_tokens: int = 0
    looked_up_blocks: int = 0
    hits: dict[str, int] = field(default_factory=dict)
    moved: list[Moved] = field(default_factory=list)
    verified_blocks: int = 0
    worker_requests: list[int] = field(default_factory=list)
    """Requests each worker served."""
    peer_requests: int = 0
    """Lease requests sent to peers on local misses (several workers)."""
    peer_requests_spared: int = 0
    """Peers not asked because their news said they lacked the blocks."""
    seconds: float = 0.0
    timeline: list[Sample] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> list[str]:
        """The lines the demo prints."""
        looked = max(self.looked_up_blocks, 1)
        missed = self.looked_up_blocks - sum(self.hits.values())
        rates = "  ".join(f"{tier} {100 * n / looked:.1f}%" for tier, n in self.hits.items())
        lines = [
            f"prefix hits: {rates}  miss {100 * missed / looked:.1f}%"
            f"  (of {self.looked_up_blocks} looked-up blocks)",
            f"prefill tokens saved: {self.saved_tokens:,} of {self.prompt_tokens:,}"
            f" ({100 * self.saved_tokens / max(self.prompt_tokens, 1):.1f}%)",
        ]
        if len(self.worker_requests) > 1:
            lines.append(
                "requests per worker: " + ", ".join(f"{n:,}" for n in self.worker_requests)
            )
        if self.peer_requests or self.peer_requests_spared:
            lines.append(
                f"peer requests: {self.peer_requests:,} sent,"
                f" {self.peer_requests_spared:,} spared by the peers' news"
            )
        for m in self.moved:
            rate = m.bytes / m.seconds / 1e9 if m.seconds else 0.0
            lines.append(
                f"{m.kind:>7} {m.src:>4} -> {m.dst:<4} {m.blocks:>7,} blocks"
                f" {m.bytes / 2**20:>9,.1f} MiB  {rate:6.2f} GB/s"
            )
        lines.append(
            f"verified {self.verified_blocks:,} hit blocks against what was computed for them;"
            f" {self.requests} requests in {self.seconds:.2f} s"
        )
        return lines


class PrefixRouter:
    """Sends each prompt to the worker with the least prefill to do, as ``index`` knows from
    the workers' KV events: the prompt's blocks it does not cache, plus ``balance`` blocks for
    each request it was sent beyond the idlest worker (so that a popular prefix does not load
    one worker alone). Among equals: more of the prompt in G1, then G2, then the idler worker.

    Args:
        index: fed the KV events of worker ``i`` under the name ``worker_name(i)``.
        workers: how many workers there are.
        balance: blocks of prefill one request of imbalance is worth.
    """

    def __init__(self, index: KvIndex, workers: int, balance: float = 4.0) -> None:
        self.index = index
        self.sent = [0] * positive_int(workers, "workers")
        self.balance = balance

    @staticmethod
    def worker_name(i: int) -> str:
        return f"worker-{i}"

    def pick(self, prompt: Sequence[int]) -> int:
        """The worker ``prompt`` goes to."""
        cached = {o.worker: o for o in self.index.overlaps(prompt)}
        idlest = min(self.sent)

        def cost(i: int) -> tuple:
            o = cached.get(self.worker_name(i))
            blocks = o.blocks if o else 0
            g1, g2 = (o.by_tier.get(Tier.G1, 0), o.by_tier.get(Tier.G2, 0)) if o else (0, 0)
            extra = self.balance * (self.sent[i] - idlest)
            return (-blocks + extra, -g1, -g2, self.sent[i], i)

        best = min(range(len(self.sent)), key=cost)
        self.sent[best] += 1
        return best


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def g1_regions(manager: BlockManager) -> list[torch.Tensor]:
    """G1 as one ``[num_blocks, *inner]`` view per ``(layer, outer)``, in that order."""
    config = manager.config
    return [
        manager.region_view(layer, outer)
        for layer in range(config.num_layers)
        for outer in range(config.outer_dim)
    ]


def write_pattern(regions: list[torch.Tensor], blocks: list[int], hashes: list[int]) -> None:
    """Write block ``blocks[i]``'s "KV" into ``regions`` (G1's ``(layer, outer)`` regions in
    order, each ``[num_blocks, *inner]``): element ``e`` of region ``r`` is
    ``(e + (hashes[i] >> (r % 32)) % 997) % 251`` in the regions' dtype (rounded in fp8)."""
    if not blocks:
        return
    ramp = _ramp(regions[0])
    index = torch.tensor(blocks, dtype=torch.long, device=regions[0].device)
    for r, t in enumerate(regions):
        _bits(t).index_copy_(0, index, _bits(_pattern(ramp, t, hashes, r)))


def count_mismatches(regions: list[torch.Tensor], blocks: list[int], hashes: list[int]) -> int:
    """How many of ``blocks`` do not hold :func:`write_pattern`'s bytes for their hash."""
    if not blocks:
        return 0
    ramp = _ramp(regions[0])
    index = torch.tensor(blocks, dtype=torch.long, device=regions[0].device)
    bad = torch.zeros(len(blocks), dtype=torch.bool, device=regions[0].device)
    for r, t in enumerate(regions):
        got = _bits(t.index_select(0, index))
        want = _bits(_pattern(ramp, t, hashes, r))
        if not torch.equal(got, want):
            bad |= (got != want).flatten(1).any(dim=1)
    return int(bad.sum())


def _ramp(t: torch.Tensor) -> torch.Tensor:
    """``(arange(per_block + 996) % 251)`` in ``t``'s dtype: the pattern of a block with offset
    ``o`` is the slice ``[o, o + per_block)``."""
    return (torch.arange(t[0].numel() + 996, device=t.device) % 251).to(t.dtype)


def _pattern(ramp: torch.Tensor, t: torch.Tensor, hashes: list[int], region: int) -> torch.Tensor:
    """``[len(hashes), *t.shape[1:]]``: region ``region`` of each hash's block, in ``t``'s
    dtype."""
    per_block = t[0].numel()
    rows = [ramp.narrow(0, (h >> (region % 32)) % 997, per_block) for h in hashes]
    return torch.stack(rows).view(len(hashes), *t.shape[1:])


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as integers of its element size, to copy and compare bit for bit (torch
    has no indexed copies of fp8 on the CPU; int compares are faster than float ones)."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def run_demo(
    managers: Sequence[BlockManager],
    workload: ChatWorkload,
    progress: Callable[[int, int], None] | None = None,
    verify: bool = True,
    router: PrefixRouter | None = None,
) -> DemoResult:
    """Replay ``workload`` through ``managers`` (one per worker; request ``i`` goes to
    ``managers[i % len(managers)]``, or where ``router`` picks).

    Raises:
        KvBlocksError: a hit block did not hold what was computed for it, or G1 cannot hold
            one request.
    """
    size = managers[0].config.block_size
    tiers = [*managers[0].tiers, *([Tier.G4] if managers[0].peers else [])]
    turns = workload.requests()
    history: dict[int, list[int]] = {}
    result = DemoResult(worker_requests=[0] * len(managers))
    hits: Counter[Tier] = Counter()
    start = time.perf_counter()
    for i, turn in enumerate(turns):
        prompt = history.get(turn.conversation, []) + turn.system + turn.user
        worker = router.pick(prompt) if router else i % len(managers)
        manager = managers[worker]
        result.worker_requests[worker] += 1
        hit = manager.lookup(prompt)
        if verify:
            _verify(manager, hit)
            result.verified_blocks += len(hit.block_ids)
        final = prompt + turn.reply
        full = len(final) // size
        new = manager.allocate(-(-len(final) // size) - len(hit.block_ids))
        start_token = len(hit.block_ids) * size
        computed = new[: full - len(hit.block_ids)]
        tokens = final[start_token : full * size]
        hashes = sequence_hashes(tokens, size, parent=hit.last_hash)
        write_pattern(g1_regions(manager), computed, hashes)
        manager.register(computed, tokens, parent_hash=hit.last_hash)
        manager.free(hit.block_ids + new)
        history[turn.conversation] = final
        result.requests += 1
        result.prompt_tokens += len(prompt)
        result.saved_tokens += hit.num_tokens
        result.looked_up_blocks += len(prompt) // size
        hits.update(hit.from_tier)
        result.timeline.append(_sample(managers, tiers, i, result.looked_up_blocks, hits))
        if progress is not None:
            progress(i + 1, len(turns))
    for manager in managers:
        manager.flush()
    result.seconds = time.perf_counter() - start
    result.hits = {t.name: hits[t] for t in tiers}
    result.moved = _moved(managers)
    result.peer_requests = sum(m.metrics.peer_requests for m in managers)
    result.peer_requests_spared = sum(m.metrics.peer_requests_spared for m in managers)
    return result


def _verify(manager: BlockManager, hit: PrefixHit) -> None:
    bad = count_mismatches(g1_regions(manager), hit.block_ids, hit.hashes)
    if bad:
        raise KvBlocksError(f"{bad} of {len(hit.block_ids)} hit blocks hold the wrong bytes")


def _sample(
    managers: Sequence[BlockManager],
    tiers: list[Tier],
    i: int,
    looked_up: int,
    hits: Counter[Tier],
) -> Sample:
    """Hits so far, and each local tier's share cached over all workers."""
    cached: Counter[Tier] = Counter()
    total: Counter[Tier] = Counter()
    for manager in managers:
        for tier, o in manager.occupancy().items():
            cached[tier] += o.cached
            total[tier] += o.total
    return Sample(
        request=i,
        looked_up=looked_up,
        hits={t.name: hits[t] for t in tiers},
        occupancy={t.name: cached[t] / total[t] for t in total},
    )


def _moved(managers: Sequence[BlockManager]) -> list[Moved]:
    """Blocks, bytes and seconds of the copies each way between two tiers, over all workers:
    offloads first, then onboards, each by source tier."""
    blocks: Counter[tuple[str, Tier, Tier]] = Counter()
    nbytes: Counter[tuple[str, Tier, Tier]] = Counter()
    seconds: Counter[tuple[str, Tier, Tier]] = Counter()
    for manager in managers:
        m = manager.metrics
        for kind, counts, sizes in (
            ("offload", m.offload_blocks, m.offload_bytes),
            ("onboard", m.onboard_blocks, m.onboard_bytes),
        ):
            for (src, dst), count in counts.items():
                key = (kind, src, dst)
                blocks[key] += count
                nbytes[key] += sizes[(src, dst)]
                seconds[key] += m.transfer_latency[(src, dst)].total
    rows = []
    for key in sorted(blocks, key=lambda k: (k[0] != "offload", k[1].name)):
        kind, src, dst = key
        rows.append(Moved(kind, src.name, dst.name, blocks[key], nbytes[key], seconds[key]))
    return rows


def progress_bar(out=None) -> Callable[[int, int], None]:
    """A progress callback writing to ``out`` (stderr by default): a redrawn bar on a
    terminal, a line per 10% elsewhere."""
    out = out if out is not None else sys.stderr
    tty = out.isatty()
    start = time.perf_counter()
    shown = [-1]

    def update(done: int, total: int) -> None:
        elapsed = time.perf_counter() - start
        if tty:
            filled = 30 * done // total
            bar = "#" * filled + "." * (30 - filled)
            end = "\n" if done == total else ""
            print(
                f"\r[{bar}] {done}/{total} requests {elapsed:.1f}s", end=end, file=out, flush=True
            )
        elif 10 * done // total > shown[0]:
            shown[0] = 10 * done // total
            print(f"{done}/{total} requests {elapsed:.1f}s", file=out, flush=True)

    return update


def plot_demo(result: DemoResult, path: str, window: int = 20) -> None:
    """A PNG of the hit rate per tier (over the last ``window`` requests) and of each tier's
    occupancy, per request."""
    plt = pyplot()
    samples = result.timeline
    x = [s.request + 1 for s in samples]
    tiers = list(samples[0].hits) if samples else []
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for tier in tiers:
        rates = []
        for i, s in enumerate(samples):
            before = samples[i - window] if i >= window else None
            looked = s.looked_up - (before.looked_up if before else 0)
            hit = s.hits[tier] - (before.hits[tier] if before else 0)
            rates.append(100 * hit / looked if looked else 0.0)
        top.plot(x, rates, label=f"{tier} hits")
        if tier in samples[0].occupancy:  # G4 is other workers' G2: no occupancy of its own
            bottom.plot(x, [100 * s.occupancy[tier] for s in samples], label=tier)
    top.set_ylabel(f"% of looked-up blocks\n(last {window} requests)")
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.set_ylabel("% of tier cached")
    bottom.set_xlabel("request")
    bottom.legend(loc="upper left")
    bottom.grid(alpha=0.3)
    fig.suptitle("kvblocks demo: prefix hits and tier occupancy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
