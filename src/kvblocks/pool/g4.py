"""A manager's side of G4, the blocks other workers cache in their G2: reading a prefix's next
blocks from the peer that caches the most of them (:class:`PeerReads`), and G2 as a
:class:`~kvblocks.pool.sharing.BlockServer` serves it to them (:class:`ServedG2`).
:mod:`kvblocks.pool.sharing` is the conversation; :mod:`kvblocks.pool.peer_set` picks peers.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from kvblocks.errors import InvalidArgumentError, KvBlocksError
from kvblocks.pool.block_pool import BlockPool
from kvblocks.pool.events import BlockRemoved, BlockStored, KvEvent
from kvblocks.pool.peer_set import Peer, PeerSet
from kvblocks.pool.sharing import BlockChain, Lease
from kvblocks.pool.tier import Tier
from kvblocks.pool.tier_set import ChainInfo, TierSet


@dataclass(frozen=True)
class _LocalPrefix:
    """The part of a prefix that the local tiers cache, from a fetch's start on: it ends at
    block ``end``; ``kept``, its G2 blocks, are held until the fetch ends; ``on_disk`` of its
    blocks only G3 caches; G1 and G2 have room for ``room`` blocks after it."""

    end: int
    kept: list[int]
    on_disk: int
    room: int


@dataclass(frozen=True)
class PeerFetch:
    """A fetch from the peers (:meth:`PeerReads.start`): the blocks before ``local_end`` are
    the local tiers' part, and ``future`` gives what :meth:`PeerReads.fetch` returns."""

    local_end: int
    future: Future

    def result_quietly(self) -> dict[int, int]:
        """The fetch's result once it ends, or nothing where it failed."""
        try:
            return self.future.result()
        except Exception:
            return {}


class PeerReads:
    """Reads into G2 the blocks of a prefix that peers cache and the local tiers do not.

    Args:
        tiers: the manager's tiers (G1 and G2 at least).
        peers: whom to ask.
    """

    def __init__(self, tiers: TierSet, peers: PeerSet) -> None:
        self._tiers = tiers
        self._peers = peers
        self._threads = ThreadPoolExecutor(2, thread_name_prefix="kvblocks-peer-reads")

    def fetch(
        self,
        hashes: list[int],
        token_ids: Sequence[int],
        start: int,
        ask_peer: str | None,
        sources: Collection[Tier],
    ) -> dict[int, int]:
        """Read into G2 the blocks after the local prefix of ``hashes[start:]`` (the part that
        G2 or G3 cache, of the tiers in ``sources``) that a peer caches, as many as G1 and G2
        have room for (``ask_peer`` is asked whatever its news says). The local prefix's G2
        blocks are held meanwhile, and room is left in G2 to stage its G3 blocks, so that the
        read does not evict the prefix it extends. Returns hash -> G2 block, each held once
        more for the caller."""
        local = self._local_prefix(hashes, start, sources)
        return self._fetch_after(local, hashes, token_ids, ask_peer)

    def start(
        self,
        hashes: list[int],
        token_ids: Sequence[int],
        start: int,
        ask_peer: str | None,
        sources: Collection[Tier],
    ) -> PeerFetch:
        """:meth:`fetch`, on a thread of its own where the local part has blocks to read from
        G3 (so that the caller reads those meanwhile), else here and now."""
        local = self._local_prefix(hashes, start, sources)
        if local.on_disk:
            future = self._threads.submit(self._fetch_after, local, hashes, token_ids, ask_peer)
            return PeerFetch(local.end, future)
        done: Future = Future()
        try:
            done.set_result(self._fetch_after(local, hashes, token_ids, ask_peer))
        except BaseException as exc:
            done.set_exception(exc)
        return PeerFetch(local.end, done)

    def close(self) -> None:
        """Wait for the fetches under way and stop their threads."""
        self._threads.shutdown(wait=True)

    def _local_prefix(
        self, hashes: list[int], start: int, sources: Collection[Tier]
    ) -> _LocalPrefix:
        """The local tiers' part of ``hashes[start:]``, its G2 blocks held."""
        tiers = self._tiers
        g1, g2 = tiers[Tier.G1].pool, tiers[Tier.G2].pool
        g3 = tiers[Tier.G3].pool if Tier.G3 in tiers and Tier.G3 in sources else None
        local_g2 = Tier.G2 in sources
        with tiers.lock:
            kept, on_disk = [], 0
            for h in hashes[start:]:
                block = g2.lookup(h) if local_g2 else None
                if block is not None:
                    kept.append(block)
                elif g3 is not None and g3.lookup(h) is not None:
                    on_disk += 1
                else:
                    break
            g2.acquire(kept)
            end = start + len(kept) + on_disk
            room = min(g1.num_available - (end - start), g2.num_available - on_disk)
        return _LocalPrefix(end, kept, on_disk, room)

    def _fetch_after(
        self,
        local: _LocalPrefix,
        hashes: list[int],
        token_ids: Sequence[int],
        ask_peer: str | None,
    ) -> dict[int, int]:
        """:meth:`fetch`'s reads after ``local``; lets ``local``'s G2 blocks go."""
        try:
            wanted = hashes[local.end : local.end + max(local.room, 0)]
            leased = self._peers.lease_longest(wanted, ask_peer) if wanted else None
            if leased is None:
                return {}
            peer, lease = leased
            try:
                return self._read(peer, lease, hashes, token_ids, local.end)
            finally:
                self._peers.let_go_later(peer, lease)
        finally:
            with self._tiers.lock:
                self._tiers[Tier.G2].pool.free(local.kept)

    def _read(
        self, peer: Peer, lease: Lease, hashes: list[int], token_ids: Sequence[int], at: int
    ) -> dict[int, int]:
        """Copy ``lease``'s blocks (the hashes from ``hashes[at]`` on) into new G2 blocks and
        cache them there; returns hash -> G2 block, held. A failed read counts against the
        peer and returns nothing."""
        tiers = self._tiers
        g2 = tiers[Tier.G2].pool
        with tiers.lock:  # G2 may have filled since the lease was asked for
            staging = g2.allocate(min(len(lease.block_ids), g2.num_available))
        try:
            tiers.copy(Tier.G4, list(lease.block_ids[: len(staging)]), Tier.G2, staging, True, peer)
        except BaseException as exc:
            with tiers.lock:
                g2.free(staging)
            if not isinstance(exc, KvBlocksError):
                raise
            self._peers.failed(peer, exc)
            return {}
        size = self._tiers.block_size
        got = hashes[at : at + len(staging)]
        with tiers.lock:
            tokens = token_ids[at * size : (at + len(staging)) * size]
            tiers.remember_chains(got, tokens, hashes[at - 1] if at else None)
            cached, new = tiers.cache_holding(g2, staging, got)
            tiers.emit_stored(Tier.G2, [h for _, h in new])
        return dict(zip(got, cached, strict=True))


class ServedG2:
    """A manager's G2 as its :class:`~kvblocks.pool.sharing.BlockServer` acts on it (called
    from the server's thread).

    Args:
        tiers: the manager's tiers (G2 among them).
        publish: publishes the events queued in ``tiers`` (after blocks peers stored).
    """

    def __init__(self, tiers: TierSet, publish: Callable[[], None]) -> None:
        self._tiers = tiers
        self._publish = publish

    @property
    def _pool(self) -> BlockPool:
        return self._tiers[Tier.G2].pool

    def cached(self) -> list[int]:
        with self._tiers.lock:
            return self._pool.cached_hashes()

    def lease(self, hashes: list[int]) -> list[int]:
        with self._tiers.lock:
            blocks = self._pool.match_sequence_hashes(hashes)
            self._pool.acquire(blocks)
        return blocks

    def release(self, blocks: list[int]) -> None:
        with self._tiers.lock:
            self._pool.free(blocks)

    def reserve(self, chains: list[BlockChain]) -> list[int]:
        size = self._tiers.block_size
        for chain in chains:
            if len(chain.token_ids) != size:
                raise InvalidArgumentError(
                    "chains", f"blocks hold {size} tokens here, got {len(chain.token_ids)}"
                )
        with self._tiers.lock:
            todo = [i for i, c in enumerate(chains) if self._pool.lookup(c.seq_hash) is None]
            ids = self._pool.allocate(min(len(todo), self._pool.num_available))
        blocks = [-1] * len(chains)
        for i, b in zip(todo, ids, strict=False):  # todo may be longer: G2 had less room
            blocks[i] = b
        return blocks

    def commit(self, blocks: list[int], chains: list[BlockChain]) -> None:
        tiers = self._tiers
        with tiers.lock:
            for c in chains:
                tiers.chains.setdefault(c.seq_hash, ChainInfo(c.parent, c.token_ids))
            _, new = tiers.cache(self._pool, blocks, [c.seq_hash for c in chains])
            tiers.emit_stored(Tier.G2, [h for _, h in new])
            self._pool.free(blocks)
        self._publish()

    def abandon(self, blocks: list[int]) -> None:
        self.release(blocks)


def g2_changes(events: Sequence[KvEvent]) -> list[tuple[bool, tuple[int, ...]]]:
    """The ``(stored, hashes)`` changes of G2 among ``events``, in order."""
    return [
        (isinstance(e, BlockStored), e.block_hashes)
        for e in events
        if isinstance(e, BlockStored | BlockRemoved) and e.tier is Tier.G2
    ]
