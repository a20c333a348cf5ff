"""Lookups with several peers: asking every peer on a local miss (the default) against asking
only the peers whose news says they cache the blocks (``add_peer(news=True)``).

``max(peers)`` caches run as ``kvblocks serve`` processes; two BlockManagers in this process
(``ask_all`` and ``news``, each with its own NIXL agent, UCX) add the first ``P`` of them as
peers, for each ``P`` of ``peers``. Wall clock of one ``lookup`` of ``num_blocks`` blocks,
median of ``iters`` after ``warmup``, both managers timed in turn:

- ``miss``: a prompt no worker caches (a new conversation): every block misses;
- ``hit``: a prompt the ``P``-th cache alone holds (a third manager offloaded it there): the
  lookup reads it from there into G2 and onboards it (the looking manager's tiers are cleared
  before each lookup).

``*_requests`` are the lease requests sent to peers per lookup (``kvbm_peer_requests``);
``speedup`` is ``ask_all_ms / news_ms``. Every lookup's hits are checked.
"""

from __future__ import annotations

import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from kvblocks.benchmarks.sharing import manager_config, nixl_transfer, store_random
from kvblocks.benchmarks.timing import progress
from kvblocks.layout import KvDims, dtype_name
from kvblocks.pool import BlockManager, Tier
from kvblocks.remote import load_api


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


@contextmanager
def cache_process(dims: KvDims, num_blocks: int) -> Iterator[str]:
    """A ``kvblocks serve`` process holding ``num_blocks`` blocks of ``dims`` on this host;
    yields its endpoint, stops it (SIGTERM) after."""
    command = [sys.executable, "-m", "kvblocks.cli", "serve", "--layers", str(dims.nl)]
    command += ["--kv-heads", str(dims.nh), "--head-dim", str(dims.hd), "--outer", str(dims.no)]
    command += ["--dtype", dtype_name(dims.dtype), "--tokens-per-block", str(dims.nt)]
    command += ["--host-gb", str(num_blocks * dims.block_bytes / 2**30)]
    command += ["--endpoint", "tcp://127.0.0.1:*", "--status-every", "3600"]
    cache = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        endpoint = cache.stdout.readline().strip()
        if not endpoint:
            raise RuntimeError(f"kvblocks serve ended with status {cache.wait()}")
        yield endpoint
    finally:
        cache.send_signal(signal.SIGTERM)
        try:
            cache.wait(timeout=60)
        except subprocess.TimeoutExpired:
            cache.kill()


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


def run(dims_for, tokens_per_block: int, num_blocks: int, peers, warmup=5, iters=50):
    """One row per (peer count of ``peers``, case)."""
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

        endpoints = [
            stack.enter_context(cache_process(dims, num_blocks)) for _ in range(max(peers))
        ]
        ask_all, news, writer = manager("ask-all"), manager("news"), manager("writer")
        added = 0
        for step, count in enumerate(sorted(peers), 1):
            progress(step, len(peers), f"peers P={count}")
            for endpoint in endpoints[added:count]:
                ask_all.add_peer(endpoint, timeout=10.0)
                news.add_peer(endpoint, timeout=10.0, news=True)
            added = count
            tokens = rng.choices(range(32_000), k=num_blocks * tokens_per_block)
            writer.add_peer(endpoints[count - 1], timeout=10.0, offload=True)
            store_random(writer, tokens, tokens_per_block)  # offloaded to that cache alone
            writer.remove_peer(endpoints[count - 1])
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
