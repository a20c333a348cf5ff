"""``kvblocks serve``: a worker that only caches blocks, for the others (their tier G4).

::

    kvblocks serve --model llama-3.1-70b --host-gb 200 --endpoint "tcp://*:5600"

Its BlockManager keeps a G2 of ``host_gb`` GiB of pinned host memory (and a single G1 block,
which it never uses) and serves it with ``stores=True``. Workers add it as a peer with
``add_peer(endpoint, offload=True)``: every block they store in their G2 is then written to
its G2 too, and every worker that adds it reads from it the prefixes it misses locally. When
full it evicts the least recently used blocks. See "Sharing blocks between workers" in
``docs/pool.md``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TextIO

from kvblocks.models import ModelSpec
from kvblocks.pool import (
    BlockManager,
    BlockManagerConfig,
    EventPublisher,
    Tier,
    prometheus_registry,
    serve_metrics,
)


@dataclass(frozen=True)
class CacheStatus:
    """What the cache holds now, and what it did since it started."""

    cached: int
    """G2 blocks findable by hash."""
    total: int
    """G2 blocks in all."""
    leases: int
    """Leases and reservations of peers held now."""
    evicted: int
    """Blocks evicted to make room."""

    @classmethod
    def of(cls, manager: BlockManager) -> CacheStatus:
        g2 = manager.occupancy()[Tier.G2]
        leases = manager.num_peer_leases
        return cls(g2.cached, g2.total, leases, manager.metrics.evictions[Tier.G2])

    def line(self) -> str:
        share = 100 * self.cached / max(self.total, 1)
        return (
            f"{time.strftime('%H:%M:%S')} G2 {self.cached:,} of {self.total:,} blocks cached"
            f" ({share:.1f}%), {self.leases} leases held, {self.evicted:,} evicted"
        )


def cache_config(spec: ModelSpec, tokens_per_block: int, dtype: str, host_gb: float):
    """The config of a cache of ``host_gb`` GiB of G2 for blocks of ``spec``."""
    return BlockManagerConfig.from_dims(
        spec.dims(tokens_per_block, dtype),
        device_blocks=1,
        enable_offload=True,
        host_cache_gb=host_gb,
        nixl_backend="UCX",
    )


def serve_cache(
    config: BlockManagerConfig,
    endpoint: str,
    stop: threading.Event,
    *,
    news_endpoint: str | None = None,
    publisher: EventPublisher | None = None,
    metrics: tuple[str, int] | None = None,
    status_every: float = 10.0,
    out: TextIO,
    log: TextIO,
) -> None:
    """Serve a cache until ``stop`` is set, then close it (leases let go, sockets closed).

    Writes the endpoint bound, then the news endpoint, one per line, to ``out`` as soon as
    peers can connect; a :class:`CacheStatus` line to ``log`` every ``status_every`` seconds.

    Args:
        metrics: ``(address, port)`` to serve the Prometheus metrics at (``/metrics``).
    """
    with BlockManager(config, publisher=publisher) as manager:
        bound = manager.serve(endpoint, stores=True, news_endpoint=news_endpoint)
        server = None
        if metrics is not None:
            server = serve_metrics(prometheus_registry(manager.metrics), metrics[1], metrics[0])
        try:
            print(bound, manager.news_endpoint, sep="\n", file=out, flush=True)
            g2 = manager.pool(Tier.G2).num_blocks
            print(
                f"kvblocks serve: {g2:,} blocks of {config.block_bytes:,} bytes in G2"
                f" ({g2 * config.block_bytes / 2**30:.2f} GiB), serving at {bound}",
                file=log,
                flush=True,
            )
            if server is not None:
                host, port = server.server_address[:2]
                print(f"metrics at http://{host}:{port}/metrics", file=log, flush=True)
            while not stop.wait(status_every):
                print(CacheStatus.of(manager).line(), file=log, flush=True)
            print(f"{CacheStatus.of(manager).line()}; stopping", file=log, flush=True)
        finally:
            if server is not None:
                server.shutdown()
