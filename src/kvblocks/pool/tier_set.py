"""The tiers of one worker and the bookkeeping that every part of a ``BlockManager`` shares:
each tier's pool, layout and transfer handle, the one lock over all of them, what each cached
hash chains to (for events and G3's journal), and the KV events their changes make until they
are published.

The lock guards the pools, the chains and the pending events; copies run outside it
(:meth:`TierSet.copy`), on blocks held in their pools so that no eviction races them.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator, Mapping, Sequence, ValuesView
from dataclasses import dataclass

from kvblocks.pool.block_pool import BlockPool
from kvblocks.pool.events import BlockRemoved, BlockStored, KvEvent
from kvblocks.pool.journal import Journal
from kvblocks.pool.metrics import PoolMetrics
from kvblocks.pool.peer_set import Peer
from kvblocks.pool.tier import Tier
from kvblocks.storage import PhysicalLayout
from kvblocks.transfer import LayoutHandle, TransferManager


@dataclass
class TierState:
    """One tier: its pool of block ids, the memory behind them and its transfer handle."""

    tier: Tier
    pool: BlockPool
    physical: PhysicalLayout
    handle: LayoutHandle


@dataclass(frozen=True)
class ChainInfo:
    """What an event needs of a cached block besides its hash: its parent's hash (None for the
    first block of a sequence) and its ``block_size`` tokens."""

    parent: int | None
    token_ids: tuple[int, ...]


class TierSet(Mapping[Tier, TierState]):
    """The tiers of one worker, fastest first, as a mapping ``Tier -> TierState``.

    Args:
        transfer: moves blocks between the tiers' layouts (and peers').
        metrics: counts transfers and evictions.
        block_size: tokens per block.
        block_bytes: bytes of one block (every layer, K and V).

    Attributes:
        lock: held while reading or changing a pool, :attr:`chains` or the pending events.
        chains: hash -> :class:`ChainInfo` of every hash some tier caches (and of hashes
            registered a moment ago that no tier caches yet).
        journal: G3's record of its blocks (None without G3); evictions from G3 are written
            to it.
        metrics, block_size, block_bytes: as given.
    """

    def __init__(
        self, transfer: TransferManager, metrics: PoolMetrics, block_size: int, block_bytes: int
    ) -> None:
        self.lock = threading.RLock()
        self.chains: dict[int, ChainInfo] = {}
        self.journal: Journal | None = None
        self._transfer = transfer
        self.metrics = metrics
        self.block_size = block_size
        self.block_bytes = block_bytes
        self._states: dict[Tier, TierState] = {}
        self._pending: list[KvEvent] = []

    def __getitem__(self, tier: Tier) -> TierState:
        return self._states[tier]

    def __iter__(self) -> Iterator[Tier]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, tier: object) -> bool:
        return tier in self._states

    def get(self, tier: Tier, default: TierState | None = None) -> TierState | None:
        return self._states.get(tier, default)

    def values(self) -> ValuesView[TierState]:
        return self._states.values()

    def tier_of(self, sequence_hash: int) -> Tier | None:
        """The fastest tier that caches ``sequence_hash`` (G1, then G2, then G3); None where
        none does. Under :attr:`lock`."""
        for tier, state in self._states.items():
            if state.pool.lookup(sequence_hash) is not None:
                return tier
        return None

    def add(self, tier: Tier, physical: PhysicalLayout) -> TierState:
        """Give ``tier`` a pool over ``physical``'s blocks and register its layout."""
        pool = BlockPool(
            physical.config.num_blocks,
            self.block_size,
            on_evict=lambda hashes, tier=tier: self._evicted(tier, hashes),
        )
        handle = self._transfer.register_layout(physical)
        state = TierState(tier, pool, physical, handle)
        self._states[tier] = state
        return state

    def release(self) -> None:
        """Let go of every tier's layout and memory, and close the journal."""
        for state in self._states.values():
            self._transfer.release_layout(state.handle)
            state.physical.release()
        self._states.clear()
        if self.journal is not None:
            self.journal.close()
            self.journal = None

    def copy(
        self,
        src: Tier,
        src_ids: Sequence[int],
        dst: Tier,
        dst_ids: Sequence[int],
        onboard: bool,
        peer: Peer | None = None,
    ) -> None:
        """Copy held blocks between tiers, wait for the copy and count it; ``peer`` is the
        worker of a G4 side. Call it without the lock."""
        if not src_ids:
            return
        start = time.perf_counter()
        source = peer.handle if src is Tier.G4 else self._states[src].handle
        destination = peer.handle if dst is Tier.G4 else self._states[dst].handle
        self._transfer.execute_transfer(source, src_ids, destination, dst_ids).wait()
        self.record_copy(src, dst, len(src_ids), time.perf_counter() - start, onboard)

    def record_copy(self, src: Tier, dst: Tier, blocks: int, seconds: float, onboard: bool) -> None:
        """Count a copy of ``blocks`` whole blocks from ``src`` to ``dst`` that took
        ``seconds``, an onboard (up the tiers, for a hit) or an offload."""
        self.metrics.record_transfer(src, dst, blocks, blocks * self.block_bytes, seconds, onboard)

    def cache(
        self, pool: BlockPool, blocks: list[int], hashes: list[int]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Mark held ``blocks`` full and register each under its hash (:meth:`BlockPool.cache`).
        Returns, per block, the block that caches the hash from now on (itself, or one that
        already did, in which case it stays unregistered), and the ``(block, hash)`` pairs
        newly cached by their own block. Under the lock."""
        cached = pool.cache(blocks, hashes)
        new = [(b, h) for b, c, h in zip(blocks, cached, hashes, strict=True) if c == b]
        return cached, new

    def cache_holding(
        self, pool: BlockPool, blocks: list[int], hashes: list[int]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """:meth:`cache`, with the caller's hold on each block that stays unregistered moved
        to the block that caches its hash. Returns the blocks held, one per hash in order, and
        the ``(block, hash)`` pairs newly cached. Under the lock."""
        cached, new = self.cache(pool, blocks, hashes)
        for b, c in zip(blocks, cached, strict=True):
            if c != b:  # another transfer cached it meanwhile: hold that one instead
                pool.acquire([c])
                pool.free([b])
        return cached, new

    def remember_chains(
        self, hashes: list[int], token_ids: Sequence[int], parent: int | None
    ) -> None:
        """Keep each block's parent hash and tokens (``block_size`` tokens per hash, in
        order; ``parent`` is the hash before ``hashes[0]``). Under the lock."""
        size = self.block_size
        parents = [parent, *hashes][: len(hashes)]
        for i, (h, p) in enumerate(zip(hashes, parents, strict=True)):
            self.chains.setdefault(h, ChainInfo(p, tuple(token_ids[i * size : (i + 1) * size])))

    def emit(self, event: KvEvent) -> None:
        """Queue ``event`` for the next publish. Under the lock."""
        self._pending.append(event)

    def emit_stored(self, tier: Tier, hashes: list[int]) -> None:
        """One ``BlockStored`` per run of ``hashes`` that chain parent to child. Under the
        lock."""
        run: list[int] = []
        for h in hashes:
            if run and self.chains[h].parent != run[-1]:
                self._pending.append(self._stored(tier, run))
                run = []
            run.append(h)
        if run:
            self._pending.append(self._stored(tier, run))

    def take_events(self) -> list[KvEvent]:
        """The events queued since the last call, oldest first."""
        with self.lock:
            events, self._pending = self._pending, []
        return events

    def _stored(self, tier: Tier, run: list[int]) -> BlockStored:
        tokens = tuple(itertools.chain.from_iterable(self.chains[h].token_ids for h in run))
        parent = self.chains[run[0]].parent
        return BlockStored(tuple(run), parent, tokens, self.block_size, tier)

    def _evicted(self, tier: Tier, hashes: list[int]) -> None:
        """A pool dropped cached blocks (under the lock)."""
        self.metrics.record_evictions(tier, len(hashes))
        if tier is Tier.G3:
            self.journal.record_removed(hashes)
        self._pending.append(BlockRemoved(tuple(hashes), tier))
        for h in hashes:
            if not any(s.pool.lookup(h) is not None for s in self._states.values()):
                self.chains.pop(h, None)
