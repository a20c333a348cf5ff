"""Lookups with several peers: asking every peer on a local miss (the default) against asking
only the peers whose news says they cache the blocks (``add_peer(news=True)``).

``max(peers)`` BlockManagers serve their G2; two more (``ask_all`` and ``news``) add the first
``P`` of them as peers, for each ``P`` of ``peers``. All run in this process, each with its own
NIXL agent (UCX). Wall clock of one ``lookup`` of ``num_blocks`` blocks, median of ``iters``
after ``warmup``, both managers timed in turn:

- ``miss``: a prompt no worker caches (a new conversation): every block misses;
- ``hit``: a prompt the ``P``-th peer alone caches: the lookup reads it from there into G2
  and onboards it (the looking manager's tiers are cleared before each lookup).

``*_requests`` are the lease requests sent to peers per lookup (``kvbm_peer_requests``);
``speedup`` is ``ask_all_ms / news_ms``. Every lookup's hits are checked.
"""

from __future__ import annotations

import random
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from kvblocks.benchmarks.sharing import manager_config, nixl_transfer, store_random
from kvblocks.benchmarks.timing import progress
from kvblocks.layout import KvDims
from kvblocks.pool import BlockManager, Tier
from kvblocks.remote import load_api

#: Peer counts timed by default.
PEER_COUNTS = (1, 2, 4, 8)


@dataclass(frozen=True)
class PeersRow:
    peers: int
    case: str
    num_blocks: int
    ask_all_ms: float
    news_ms: float
    speedup: float
    ask_all_requests: float
    news_requests: float


def wait_for_news(here: BlockManager, endpoint: str, tokens: list[int], blocks: int) -> None:
    """Wait (up to 10 s) until the peer at ``endpoint`` has announced ``blocks`` blocks of
    ``tokens`` to ``here``."""
    deadline = time.monotonic() + 10.0
    while here.peer_prefixes(tokens)[endpoint] != blocks:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{endpoint} did not announce {blocks} blocks within 10 s")
        time.sleep(0.001)


def _timed(manager: BlockManager, tokens: list[int], from_peer: int) -> tuple[float, int]:
    """Seconds of one lookup (its tiers cleared first) and the peer requests it sent; checks
    that ``from_peer`` blocks came from a peer and the rest missed."""
    manager.clear()
    before = manager.metrics.peer_requests
    start = time.perf_counter()
    hit = manager.lookup(tokens)
    seconds = time.perf_counter() - start
    manager.free(hit.block_ids)
    if hit.from_tier.get(Tier.G4, 0) != from_peer or len(hit.block_ids) != from_peer:
        raise RuntimeError(f"the lookup found {hit.from_tier}, not {from_peer} blocks in G4")
    return seconds, manager.metrics.peer_requests - before


def run(dims_for, tokens_per_block: int, num_blocks: int, peers=PEER_COUNTS, warmup=5, iters=50):
    """One row per (peer count, case)."""
    load_api()
    device = torch.cuda.current_device() if torch.cuda.is_available() else 0
    dims: KvDims = dims_for(tokens_per_block)
    config = manager_config(dims, num_blocks)
    rng = random.Random(0)
    rows = []
    with ExitStack() as stack:

        def manager(name: str) -> BlockManager:
            transfer = stack.enter_context(nixl_transfer(name, device))
            return stack.enter_context(BlockManager(config, transfer=transfer))

        servers = [manager(f"peer{i}") for i in range(max(peers))]
        endpoints = [s.serve("tcp://127.0.0.1:*") for s in servers]
        ask_all, news = manager("ask-all"), manager("news")
        added = 0
        for step, count in enumerate(sorted(peers), 1):
            progress(step, len(peers), f"peers P={count}")
            for endpoint in endpoints[added:count]:
                ask_all.add_peer(endpoint, timeout=10.0)
                news.add_peer(endpoint, timeout=10.0, news=True)
            added = count
            tokens = rng.choices(range(32_000), k=num_blocks * tokens_per_block)
            store_random(servers[count - 1], tokens, tokens_per_block)
            wait_for_news(news, endpoints[count - 1], tokens, num_blocks)
            miss = rng.choices(range(32_000), k=num_blocks * tokens_per_block)
            for case, prompt, from_peer in (("miss", miss, 0), ("hit", tokens, num_blocks)):
                times = {ask_all: [], news: []}
                requests = {ask_all: 0, news: 0}
                for i in range(warmup + iters):
                    for m in (ask_all, news):
                        seconds, sent = _timed(m, prompt, from_peer)
                        if i >= warmup:
                            times[m].append(seconds)
                            requests[m] += sent
                all_ms = statistics.median(times[ask_all]) * 1e3
                news_ms = statistics.median(times[news]) * 1e3
                rows.append(
                    PeersRow(
                        count,
                        case,
                        num_blocks,
                        round(all_ms, 3),
                        round(news_ms, 3),
                        round(all_ms / news_ms, 2),
                        requests[ask_all] / iters,
                        requests[news] / iters,
                    )
                )
    return rows
