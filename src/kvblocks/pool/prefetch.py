"""Prefetching: reading the blocks of a prompt's cached prefix that only G3 or a peer holds into
G2 on a background thread, so that a later lookup copies the whole prefix from G2 and never
waits for a disk or a network (:meth:`BlockManager.prefetch`). The disk's blocks and the peer's
after them are read at once, on two threads.

A :class:`Prefetch` holds the prefix's G2 blocks (those found there, and those read into it)
until :meth:`Prefetch.release`: G2 does not evict them meanwhile. The blocks that G1 caches
are counted, not held. Prefetches hold at most a ``1 / PREFETCH_SHARE`` of G2's blocks at
once, so that offloads and lookups keep room there; a prefix past that is brought in part.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass

from kvblocks.pool.g4 import PeerReads
from kvblocks.pool.metrics import PoolMetrics
from kvblocks.pool.onboarder import Onboarder
from kvblocks.pool.tier import Tier
from kvblocks.pool.tier_set import TierSet
from kvblocks.pool.window import window_hit

#: Prefetches together hold at most ``G2's blocks // PREFETCH_SHARE`` G2 blocks.
PREFETCH_SHARE = 2

#: The tiers a prefetch's peer reads may count on below G1 (all of them).
_ALL_SOURCES = frozenset({Tier.G2, Tier.G3, Tier.G4})


class Prefetch:
    """One prompt's prefix on its way into G2 (:meth:`BlockManager.prefetch`).

    Use it as a context manager, or call :meth:`release` once the lookup that needed it is
    done (or the request is dropped): until then its G2 blocks stay held.
    """

    def __init__(self, let_go: Callable[[Prefetch, list[int]], None]) -> None:
        self._let_go = let_go
        self._future: Future[dict[Tier, int]] = Future()
        self._lock = threading.Lock()
        self._held: list[int] = []
        self._released = False

    def done(self) -> bool:
        """Whether the reads have ended (or failed, or the prefetch was released before they
        started)."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> dict[Tier, int]:
        """Wait for the reads to end; returns how many blocks of the prefix are where: ``G1``
        (cached in G1, not held: if G1 evicts one before the lookup, the lookup takes it from
        where the offload put it), ``G2`` (found in G2, held), ``G3`` (read from disk into G2,
        checked, held), ``G4`` (read from a peer into G2, held). The prefix ends at the first
        block that no tier or peer caches, that failed its checksum, or past the share of G2
        that prefetches may hold.

        Raises:
            TimeoutError: ``timeout`` seconds passed first (the reads go on).
            TransferError: a read failed; nothing is held.
            concurrent.futures.CancelledError: released (or the manager closed) before the
                reads ended.
        """
        return dict(self._future.result(timeout))

    def add_done_callback(self, fn: Callable[[Prefetch], None]) -> None:
        """Call ``fn(self)`` once :meth:`done` (at once, on this thread, if it is already).
        Otherwise it runs on the manager's prefetch thread (or the one that releases it), so
        ``fn`` should only pass the news on: ``loop.call_soon_threadsafe(...)`` for an asyncio
        scheduler, a queue's ``put``. An exception ``fn`` raises is logged and dropped."""
        self._future.add_done_callback(lambda _: fn(self))

    @property
    def num_blocks(self) -> int:
        """The prefix's length in blocks once :meth:`done`; 0 before, or if it failed."""
        future = self._future
        if not future.done() or future.cancelled() or future.exception() is not None:
            return 0
        return sum(future.result().values())

    def release(self) -> None:
        """Let the prefix's G2 blocks go (they stay cached, evictable as any other): reads
        not started are not made, reads under way are let go when they end. Releasing again
        does nothing."""
        with self._lock:
            if self._released:
                return
            self._released = True
            self._future.cancel()
            held, self._held = self._held, []
        self._let_go(self, held)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _start(self) -> bool:
        """Whether the reads may start (not released meanwhile)."""
        return self._future.set_running_or_notify_cancel()

    def _finish(self, counts: dict[Tier, int], held: list[int]) -> None:
        """Keep ``held`` for the caller and say ``counts``; if released meanwhile, let ``held``
        go and say it was cancelled."""
        with self._lock:
            released = self._released
            if not released:
                self._held = held
        if released:
            self._let_go(self, held)
            self._future.set_exception(CancelledError("released before its reads ended"))
        else:
            self._future.set_result(counts)

    def _fail(self, exc: BaseException) -> None:
        self._future.set_exception(exc)


@dataclass(frozen=True)
class PrefetchRequest:
    """What one prefetch brings: the prefix of ``hashes`` (the full blocks of ``token_ids``)
    from its block ``first_block`` on; with ``peers``, the peers are asked for the blocks
    after the local tiers' part (``ask_peer`` whatever its news says)."""

    hashes: list[int]
    token_ids: Sequence[int]
    first_block: int
    ask_peer: str | None
    peers: bool


@dataclass
class _Found:
    """Where each block of a prefix was found: ``(tier, block)``, the block held in G2 or G3,
    None for G1's (not held); and the G2 staging blocks allocated for the G3 ones."""

    blocks: list[tuple[Tier, int | None]]
    staging: list[int]


class Prefetcher:
    """The background thread of one manager's prefetches, and their share of G2.

    Args:
        tiers: the manager's tiers (G2 must be there).
        onboarder: reads G3 blocks into G2 and checks them.
        peer_reads: reads from peers into G2.
        metrics: counts the prefetched blocks.
        publish: publishes the events of the blocks stored in G2.
        window_blocks: blocks a sliding-window hit holds (None: full attention).
    """

    def __init__(
        self,
        tiers: TierSet,
        onboarder: Onboarder,
        peer_reads: PeerReads,
        metrics: PoolMetrics,
        publish: Callable[[], None],
        window_blocks: int | None,
    ) -> None:
        self._tiers = tiers
        self._onboarder = onboarder
        self._peer_reads = peer_reads
        self._metrics = metrics
        self._publish = publish
        self._window_blocks = window_blocks
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="kvblocks-prefetch")
        #: Reads from peers, beside the disk's reads of the same prefetch.
        self._peer_thread = ThreadPoolExecutor(1, thread_name_prefix="kvblocks-prefetch-peers")
        self._open: set[Prefetch] = set()  # not released yet
        self._held = 0  # G2 blocks that prefetches hold, under the tiers' lock

    def submit(self, request: PrefetchRequest) -> Prefetch:
        """Queue the prefetch of ``request``."""
        prefetch = Prefetch(self._release)
        with self._tiers.lock:
            self._open.add(prefetch)
        self._thread.submit(self._run, prefetch, request)
        return prefetch

    def close(self) -> None:
        """Release every prefetch (those not started never start) and wait for the one under
        way to end."""
        with self._tiers.lock:
            prefetches = list(self._open)
        for prefetch in prefetches:
            prefetch.release()
        self._thread.shutdown(wait=True)
        self._peer_thread.shutdown(wait=True)

    def _release(self, prefetch: Prefetch, blocks: list[int]) -> None:
        with self._tiers.lock:
            self._open.discard(prefetch)
        self._let_go(blocks)

    def _let_go(self, blocks: list[int]) -> None:
        if blocks:
            with self._tiers.lock:
                self._tiers[Tier.G2].pool.free(blocks)
                self._held -= len(blocks)

    def _run(self, prefetch: Prefetch, request: PrefetchRequest) -> None:
        if not prefetch._start():
            return
        try:
            counts, held = self._bring(request)
        except BaseException as exc:
            prefetch._fail(exc)
            return
        finally:
            self._publish()
        self._metrics.record_prefetch(counts)
        prefetch._finish(counts, held)

    def _bring(self, request: PrefetchRequest) -> tuple[dict[Tier, int], list[int]]:
        """Find the prefix from the request's first block on and read its G3 blocks into G2,
        while the peers are asked for the blocks after it (kept where the disk's part came
        whole). Returns the blocks per tier and the G2 blocks held."""
        hashes = request.hashes
        span = self._span(hashes, request.first_block)
        with self._tiers.lock:
            found = self._find(hashes, span)
        after = span.start + len(found.blocks)
        peers = self._peer_thread.submit(self._fetch, request, after) if request.peers else None
        held = [b for t, b in found.blocks if t is Tier.G2]
        g3_at = [i for i, (t, _) in enumerate(found.blocks) if t is Tier.G3]
        staged: list[int] = []
        fetched: list[int] = []
        try:
            try:
                staged = self._read_disk(found, [hashes[span.start + i] for i in g3_at])
            finally:  # the peer's read ends either way
                if peers is not None:
                    fetched = peers.result()
        except BaseException:
            self._let_go(held + staged + fetched)
            raise
        end = g3_at[len(staged)] if len(staged) < len(g3_at) else len(found.blocks)
        if end < len(found.blocks):  # a bad block ended the prefix before the peer's part
            self._let_go([b for t, b in found.blocks[end:] if t is Tier.G2] + fetched)
            fetched = []
        held = [b for t, b in found.blocks[:end] if t is Tier.G2] + staged + fetched
        counts = {t: sum(f is t for f, _ in found.blocks[:end]) for t in (Tier.G1, Tier.G2)}
        counts[Tier.G3] = len(staged)
        counts[Tier.G4] = len(fetched)
        return {t: n for t, n in counts.items() if n}, held

    def _span(self, hashes: list[int], first_block: int) -> range:
        """The blocks from ``first_block`` on that a lookup would hold now: all of them (its
        prefix ends where the tiers' does), or those of a sliding window's last run of cached
        blocks."""
        if self._window_blocks is None:
            return range(first_block, max(first_block, len(hashes)))
        with self._tiers.lock:
            pools = [state.pool for state in self._tiers.values()]
            end = window_hit(
                len(hashes),
                self._window_blocks,
                lambda i: any(p.lookup(hashes[i]) is not None for p in pools),
            )
        return range(max(end - self._window_blocks, first_block), max(first_block, end))

    def _find(self, hashes: list[int], span: range) -> _Found:
        """The leading blocks of ``span`` that a local tier caches, each from G1 if there (not
        held), else G2 (held), else G3 (held, with a G2 staging block allocated), as far as the
        prefetches' share of G2 and G2's free room go. Under the lock."""
        g1, g2 = self._tiers[Tier.G1].pool, self._tiers[Tier.G2].pool
        g3 = self._tiers[Tier.G3].pool if Tier.G3 in self._tiers else None
        budget = max(0, g2.num_blocks // PREFETCH_SHARE - self._held)
        blocks: list[tuple[Tier, int | None]] = []
        for h in (hashes[i] for i in span):
            if g1.lookup(h) is not None:
                blocks.append((Tier.G1, None))
                continue
            if budget == 0:
                break
            if (block := g2.lookup(h)) is not None:
                blocks.append((Tier.G2, block))
            elif g3 is not None and (slot := g3.lookup(h)) is not None:
                blocks.append((Tier.G3, slot))
            else:
                break
            budget -= 1
        g2.acquire([b for t, b in blocks if t is Tier.G2])
        g3_at = [i for i, (t, _) in enumerate(blocks) if t is Tier.G3]
        room = g2.num_available
        if len(g3_at) > room:  # the prefix ends at the first G3 block G2 has no room for
            g2.free([b for t, b in blocks[g3_at[room] :] if t is Tier.G2])
            blocks, g3_at = blocks[: g3_at[room]], g3_at[:room]
        if g3_at:
            g3.acquire([blocks[i][1] for i in g3_at])
        staging = g2.allocate(len(g3_at))
        self._held += sum(t is not Tier.G1 for t, _ in blocks)
        return _Found(blocks, staging)

    def _read_disk(self, found: _Found, hashes: list[int]) -> list[int]:
        """Read the G3 blocks of ``found`` (of ``hashes``) into its staging blocks and check
        them; returns the G2 blocks that cache the good prefix of them, held
        (:meth:`Onboarder.stage_from_disk`)."""
        slots = [b for t, b in found.blocks if t is Tier.G3]
        if not slots:
            return []
        staged: list[int] = []
        try:
            staged = self._onboarder.stage_from_disk(slots, found.staging, hashes)
        finally:  # it let the staging blocks after the good ones go (all of them, on failure)
            with self._tiers.lock:
                self._held -= len(slots) - len(staged)
        return staged

    def _fetch(self, request: PrefetchRequest, start: int) -> list[int]:
        """Read from a peer into G2 the request's blocks from ``start`` on, within the
        prefetches' share of G2; returns them, held."""
        with self._tiers.lock:
            budget = max(0, self._tiers[Tier.G2].pool.num_blocks // PREFETCH_SHARE - self._held)
        if budget == 0:
            return []
        fetched = self._peer_reads.fetch(
            request.hashes[: start + budget],
            request.token_ids,
            start,
            request.ask_peer,
            _ALL_SOURCES,
        )
        with self._tiers.lock:
            self._held += len(fetched)
        return list(fetched.values())
