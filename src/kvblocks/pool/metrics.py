"""Counters of a BlockManager, and their Prometheus form.

:class:`PoolMetrics` is always kept (plain Python counters, read by the demo and by tests);
:func:`prometheus_registry` exposes it through prometheus_client (the ``metrics`` extra) under
these names, ``tier`` being ``GPU``, ``CPU`` or ``DISK``:

==================================  =========  ===============================================
name                                type       meaning
==================================  =========  ===============================================
``kvbm_blocks_allocated{tier}``     gauge      blocks held by requests (or by a transfer)
``kvbm_blocks_free{tier}``          gauge      blocks free or evictable
``kvbm_blocks_cached{tier}``        gauge      blocks findable by sequence hash
``kvbm_allocation_latency``         histogram  seconds per G1 allocation call
``kvbm_eviction_count{tier}``       counter    cached blocks evicted
``kvbm_hits{tier}``                 counter    looked-up blocks found in this tier
``kvbm_misses``                     counter    looked-up blocks found in no tier
``kvbm_prefetched_blocks{tier}``    counter    blocks of prefetched prefixes, by the tier
                                               they were found in (G3's and G4's were read
                                               into G2)
``kvbm_window_skipped_blocks``      counter    blocks of sliding-window hits before the
                                               window: hit, but neither held nor copied
``kvbm_offload_blocks{src,dst}``    counter    blocks copied down a tier
``kvbm_offload_bytes{src,dst}``     counter    their bytes
``kvbm_onboard_blocks{src,dst}``    counter    blocks copied up a tier on a prefix hit
``kvbm_onboard_bytes{src,dst}``     counter    their bytes
``kvbm_onboard_seconds{src,dst}``   counter    seconds those copies took (bytes over seconds:
                                               the rate :meth:`PoolMetrics.onboard_rate` gives)
``kvbm_transfer_latency{src,dst}``  histogram  seconds per transfer batch
``kvbm_corrupt_blocks``             counter    G3 blocks whose checksum did not match
``kvbm_disk_filtered_blocks``       counter    blocks stored in G2 that the disk filter kept
                                               off G3 (for then)
``kvbm_peer_requests``              counter    lease requests sent to peers on local misses
``kvbm_peer_requests_spared``       counter    peers not asked: their news says they lack
                                               the blocks (or have fewer than another)
==================================  =========  ===============================================

prometheus_client writes counters with a ``_total`` suffix (``kvbm_eviction_count_total``).
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from kvblocks.errors import BackendUnavailableError, InvalidArgumentError
from kvblocks.pool.tier import Tier

#: Histogram bucket upper bounds, in seconds.
LATENCY_BUCKETS = (1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)


@dataclass
class Histogram:
    """Observations counted into :data:`LATENCY_BUCKETS` (plus one overflow bucket)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1


@dataclass(frozen=True)
class TierOccupancy:
    """Blocks of one tier by what they hold (a gauge reading)."""

    allocated: int
    free: int
    cached: int
    total: int


class PoolMetrics:
    """What a BlockManager did since it started. Updated under its lock; read at any time."""

    def __init__(self, occupancy: Callable[[], dict[Tier, TierOccupancy]]) -> None:
        self._occupancy = occupancy
        self._lock = threading.Lock()
        self.allocation_latency = Histogram()
        self.evictions: Counter[Tier] = Counter()
        self.hits: Counter[Tier] = Counter()
        self.misses = 0
        self.prefetched: Counter[Tier] = Counter()
        self.window_skipped = 0
        self.offload_blocks: Counter[tuple[Tier, Tier]] = Counter()
        self.offload_bytes: Counter[tuple[Tier, Tier]] = Counter()
        self.onboard_blocks: Counter[tuple[Tier, Tier]] = Counter()
        self.onboard_bytes: Counter[tuple[Tier, Tier]] = Counter()
        self.onboard_seconds: Counter[tuple[Tier, Tier]] = Counter()
        self.transfer_latency: dict[tuple[Tier, Tier], Histogram] = {}
        self.corrupt_blocks = 0
        self.disk_filtered_blocks = 0
        self.peer_requests = 0
        self.peer_requests_spared = 0

    def occupancy(self) -> dict[Tier, TierOccupancy]:
        """Blocks per tier, read now."""
        return self._occupancy()

    def record_transfer(
        self, src: Tier, dst: Tier, blocks: int, nbytes: int, seconds: float, onboard: bool
    ) -> None:
        with self._lock:
            key = (src, dst)
            (self.onboard_blocks if onboard else self.offload_blocks)[key] += blocks
            (self.onboard_bytes if onboard else self.offload_bytes)[key] += nbytes
            if onboard:
                self.onboard_seconds[key] += seconds
            self.transfer_latency.setdefault(key, Histogram()).observe(seconds)

    def onboard_rate(self, src: Tier, dst: Tier) -> float | None:
        """Bytes per second that the copies from ``src`` up into ``dst`` on prefix hits moved
        so far, or None before the first. G3's blocks come up through G2: ``(Tier.G3,
        Tier.G2)`` is the disk's read rate, ``(Tier.G4, Tier.G2)`` the peers', ``(Tier.G2,
        Tier.G1)`` PCIe's. Each copy is timed from its start to its end, except the copies
        into G1 of a ``lookup(..., wait=False)`` on a machine without a GPU, timed until the
        manager next looks at them (on a GPU, CUDA events time them)."""
        with self._lock:
            seconds = self.onboard_seconds[(src, dst)]
            return self.onboard_bytes[(src, dst)] / seconds if seconds > 0 else None

    def record_lookup(self, hits: dict[Tier, int], misses: int, skipped: int = 0) -> None:
        with self._lock:
            self.hits.update(hits)
            self.misses += misses
            self.window_skipped += skipped

    def record_prefetch(self, blocks: dict[Tier, int]) -> None:
        with self._lock:
            self.prefetched.update(blocks)

    def record_evictions(self, tier: Tier, count: int) -> None:
        with self._lock:
            self.evictions[tier] += count

    def record_allocation(self, seconds: float) -> None:
        with self._lock:
            self.allocation_latency.observe(seconds)

    def record_corrupt(self, count: int) -> None:
        with self._lock:
            self.corrupt_blocks += count

    def record_disk_filtered(self, count: int) -> None:
        with self._lock:
            self.disk_filtered_blocks += count

    def record_peer_requests(self, asked: int, spared: int) -> None:
        with self._lock:
            self.peer_requests += asked
            self.peer_requests_spared += spared


def prometheus_registry(metrics: PoolMetrics, registry=None):
    """Register ``metrics`` with a prometheus_client registry (a new one by default; pass
    ``prometheus_client.REGISTRY`` for the process-wide one) and return the registry."""
    try:
        import prometheus_client
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
    except ImportError:
        raise BackendUnavailableError(
            "prometheus_client is not installed: pip install 'kvblocks[metrics]'"
        ) from None

    def histogram(family, labels, h: Histogram) -> None:
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), h.counts, strict=True):
            cumulative += count
            buckets.append((_bound(bound), cumulative))
        family.add_metric(labels, buckets, h.total)

    class Collector:
        def collect(self) -> Iterator:
            occupancy = metrics.occupancy()
            for name, attr, doc in (
                ("kvbm_blocks_allocated", "allocated", "Blocks held by requests or transfers"),
                ("kvbm_blocks_free", "free", "Blocks free or evictable"),
                ("kvbm_blocks_cached", "cached", "Blocks findable by sequence hash"),
            ):
                gauge = GaugeMetricFamily(name, doc, labels=["tier"])
                for tier, occ in occupancy.items():
                    gauge.add_metric([tier.medium], getattr(occ, attr))
                yield gauge
            with metrics._lock:
                latency = HistogramMetricFamily(
                    "kvbm_allocation_latency", "Seconds per G1 allocation call"
                )
                histogram(latency, [], metrics.allocation_latency)
                yield latency
                evictions = CounterMetricFamily(
                    "kvbm_eviction_count", "Cached blocks evicted", labels=["tier"]
                )
                hits = CounterMetricFamily(
                    "kvbm_hits", "Looked-up blocks found in this tier", labels=["tier"]
                )
                for tier in occupancy:
                    evictions.add_metric([tier.medium], metrics.evictions[tier])
                for tier in [*occupancy, *(t for t in metrics.hits if t not in occupancy)]:
                    hits.add_metric([tier.medium], metrics.hits[tier])
                prefetched = CounterMetricFamily(
                    "kvbm_prefetched_blocks",
                    "Blocks of prefetched prefixes, by the tier they were found in",
                    labels=["tier"],
                )
                for tier in (t for t in Tier if t in metrics.prefetched):
                    prefetched.add_metric([tier.medium], metrics.prefetched[tier])
                yield evictions
                yield hits
                yield prefetched
                yield CounterMetricFamily(
                    "kvbm_misses", "Looked-up blocks found in no tier", value=metrics.misses
                )
                yield CounterMetricFamily(
                    "kvbm_corrupt_blocks",
                    "G3 blocks whose checksum did not match",
                    value=metrics.corrupt_blocks,
                )
                for name, doc, value in (
                    (
                        "kvbm_window_skipped_blocks",
                        "Blocks of sliding-window hits before the window, neither held nor copied",
                        metrics.window_skipped,
                    ),
                    (
                        "kvbm_disk_filtered_blocks",
                        "Blocks stored in G2 that the disk filter kept off G3 (for then)",
                        metrics.disk_filtered_blocks,
                    ),
                    (
                        "kvbm_peer_requests",
                        "Lease requests sent to peers on local misses",
                        metrics.peer_requests,
                    ),
                    (
                        "kvbm_peer_requests_spared",
                        "Peers not asked: their news says they lack the blocks",
                        metrics.peer_requests_spared,
                    ),
                ):
                    yield CounterMetricFamily(name, doc, value=value)
                for name, counter, doc in (
                    ("kvbm_offload_blocks", metrics.offload_blocks, "Blocks copied down a tier"),
                    ("kvbm_offload_bytes", metrics.offload_bytes, "Bytes copied down a tier"),
                    ("kvbm_onboard_blocks", metrics.onboard_blocks, "Blocks copied up a tier"),
                    ("kvbm_onboard_bytes", metrics.onboard_bytes, "Bytes copied up a tier"),
                    (
                        "kvbm_onboard_seconds",
                        metrics.onboard_seconds,
                        "Seconds of the copies up a tier",
                    ),
                ):
                    family = CounterMetricFamily(name, doc, labels=["src", "dst"])
                    for (src, dst), value in sorted(counter.items(), key=_tier_pair):
                        family.add_metric([src.medium, dst.medium], value)
                    yield family
                transfer = HistogramMetricFamily(
                    "kvbm_transfer_latency", "Seconds per transfer batch", labels=["src", "dst"]
                )
                for (src, dst), h in sorted(metrics.transfer_latency.items(), key=_tier_pair):
                    histogram(transfer, [src.medium, dst.medium], h)
                yield transfer

    registry = registry if registry is not None else prometheus_client.CollectorRegistry()
    registry.register(Collector())
    return registry


def serve_metrics(registry, port: int, addr: str = "127.0.0.1"):
    """Serve ``registry`` over HTTP at ``http://addr:port/metrics`` from a daemon thread;
    returns the server (``server.shutdown()`` stops it). Port 0 picks a free port
    (``server.server_port``)."""
    try:
        import prometheus_client
    except ImportError:
        raise BackendUnavailableError(
            "prometheus_client is not installed: pip install 'kvblocks[metrics]'"
        ) from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise InvalidArgumentError("port", f"must be in [0, 65536), got {port!r}")
    server, _thread = prometheus_client.start_http_server(port, addr=addr, registry=registry)
    return server


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _tier_pair(item) -> tuple[str, str]:
    (src, dst), _ = item
    return src.name, dst.name
