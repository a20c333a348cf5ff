"""The block manager: which blocks exist, who holds them, where they live, what changed.

- :mod:`~kvblocks.pool.hashing`: sequence hashes, deterministic across processes and machines.
- :class:`BlockPool`: the blocks of one tier: allocation, sharing, prefix lookup, LRU eviction.
- :class:`BlockManager`: tiers G1/G2/G3 with offload and onboard, configured by
  :class:`BlockManagerConfig` (:class:`DeviceLayout`: the shapes of the engine's cache), and
  G4: blocks read from other workers' G2 (:mod:`~kvblocks.pool.sharing`).
- :mod:`~kvblocks.pool.events`: KV events and their publishers (in-process; ZMQ and NATS in
  :mod:`~kvblocks.pool.publishers`).
- :class:`KvIndex`: which worker caches which prefix, from their KV events (for routers), fed
  from the network by :class:`~kvblocks.pool.zmq_subscriber.ZmqSubscriber` and
  :class:`~kvblocks.pool.nats_subscriber.NatsSubscriber` (what they deliver to and report:
  :mod:`~kvblocks.pool.event_sink`).
- :class:`Prefetch`: a prompt's prefix read from G3 and peers into G2 in the background
  (:meth:`BlockManager.prefetch`), so that its lookup waits for no disk.
- :class:`ReadyLayers`: when each layer of a hit's blocks is in G1, after a lookup that
  returned before its copies ended.
- :func:`lookup_groups`: one prefix for every group of a hybrid model's layers (full
  attention beside sliding windows, :mod:`~kvblocks.pool.window`).
- :mod:`~kvblocks.pool.offload_filter`: which blocks go to disk (:class:`FrequencyFilter`).
- :func:`skip_slow_reads`: whether a lookup should read a prompt's blocks from disk and peers
  or leave them to be computed; :func:`read_split`: where to split them between computing and
  reading at once (:mod:`~kvblocks.pool.read_choice`).
- :mod:`~kvblocks.pool.metrics`: counters, and their Prometheus form.
"""

from kvblocks.pool.block_pool import BlockPool, BlockState, BlockStateError, PoolExhaustedError
from kvblocks.pool.config import CPU_CACHE_ENV, DISK_CACHE_ENV, BlockManagerConfig, DeviceLayout
from kvblocks.pool.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    EventPublisher,
    FanOutPublisher,
    InProcessPublisher,
)
from kvblocks.pool.groups import lookup_groups
from kvblocks.pool.hashing import HASH_KEY, ROOT_HASH, block_hash, root_hash, sequence_hashes
from kvblocks.pool.kv_index import KvIndex, Overlap, WorkerView
from kvblocks.pool.manager import BlockManager, PrefixHit
from kvblocks.pool.metrics import PoolMetrics, TierOccupancy, prometheus_registry, serve_metrics
from kvblocks.pool.offload_filter import FrequencyFilter, OffloadFilter
from kvblocks.pool.prefetch import Prefetch
from kvblocks.pool.read_choice import (
    WITHOUT_DISK,
    WITHOUT_PEERS,
    ReadSplit,
    read_split,
    skip_slow_reads,
)
from kvblocks.pool.ready import ReadyLayers
from kvblocks.pool.tier import Tier

__all__ = [
    "CPU_CACHE_ENV",
    "DISK_CACHE_ENV",
    "HASH_KEY",
    "ROOT_HASH",
    "AllBlocksCleared",
    "BlockManager",
    "BlockManagerConfig",
    "BlockPool",
    "BlockRemoved",
    "BlockState",
    "BlockStateError",
    "BlockStored",
    "DeviceLayout",
    "EventBatch",
    "EventPublisher",
    "FanOutPublisher",
    "FrequencyFilter",
    "InProcessPublisher",
    "KvIndex",
    "OffloadFilter",
    "Overlap",
    "PoolExhaustedError",
    "PoolMetrics",
    "Prefetch",
    "PrefixHit",
    "ReadSplit",
    "ReadyLayers",
    "Tier",
    "TierOccupancy",
    "WITHOUT_DISK",
    "WITHOUT_PEERS",
    "WorkerView",
    "block_hash",
    "lookup_groups",
    "prometheus_registry",
    "read_split",
    "root_hash",
    "sequence_hashes",
    "serve_metrics",
    "skip_slow_reads",
]
