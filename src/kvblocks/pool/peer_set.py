"""The peers of one :class:`~kvblocks.pool.manager.BlockManager`: the workers whose G2 it reads
from (its tier G4) and, for those added with ``offload``, writes to.

A :class:`PeerSet` holds the manager's side of the conversation of :mod:`kvblocks.pool.sharing`:
it greets a peer and imports its G2 layout, chooses whom to ask for a prefix (by their news,
:mod:`kvblocks.pool.peer_index`, where followed), asks them at once and keeps the longest lease,
reserves and commits the blocks an offload writes, lets go of leases in the background, and
leaves a peer that failed alone for :data:`PEER_RETRY_S` seconds. The copies themselves, and the
manager's own pools, stay with the manager: this module holds no block.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kvblocks.errors import ConfigMismatchError, InvalidArgumentError, KvBlocksError, PeerError
from kvblocks.pool.metrics import PoolMetrics
from kvblocks.pool.peer_index import PeerIndex
from kvblocks.pool.sharing import BlockChain, BlockShape, Lease, PeerClient
from kvblocks.transfer import LayoutHandle, SerializedLayout, TransferManager

log = logging.getLogger("kvblocks.pool")

#: Seconds a peer holds the blocks it leases to a lookup (released as soon as they are read).
PEER_LEASE_S = 10.0
#: Seconds a peer that failed is left alone before it is asked again.
PEER_RETRY_S = 5.0
#: Peers asked at once (more are asked in turns).
PEER_THREADS = 8


@dataclass
class Peer:
    """A worker whose G2 the manager reads from (its tier G4)."""

    client: PeerClient
    handle: LayoutHandle
    """Its G2 layout, imported."""
    server: int
    """The id its server gave in hello; a lease with another id means it restarted."""
    index: PeerIndex | None
    """What its G2 caches, from its news (None: not followed)."""
    offload: bool = False
    """Blocks stored in the manager's G2 are also written to the peer's."""
    retry_at: float = 0.0
    """Monotonic time before which it is not asked (set when it fails)."""

    def lacks(self, hashes: list[int]) -> list[int]:
        """The positions of ``hashes`` worth offering: those its news says it does not cache
        (all of them where its news is unknown or not followed)."""
        lacks = None if self.index is None else self.index.lacks(hashes)
        return [i for i in range(len(hashes)) if lacks is None or lacks[i]]


class PeerSet:
    """The peers of one manager, by endpoint, in the order they were added.

    Args:
        shape: the manager's blocks; a peer that keeps blocks of another shape is refused.
        transfer: imports and releases the peers' G2 layouts.
        metrics: counts the peers asked and spared.
    """

    def __init__(self, shape: BlockShape, transfer: TransferManager, metrics: PoolMetrics) -> None:
        self._shape = shape
        self._transfer = transfer
        self._metrics = metrics
        self._peers: dict[str, Peer] = {}
        self._lock = threading.Lock()
        #: Threads that ask the peers at once and send releases while lookups go on.
        self._asking: ThreadPoolExecutor | None = None

    @property
    def endpoints(self) -> list[str]:
        """The peers' endpoints, in the order they are asked."""
        with self._lock:
            return list(self._peers)

    def get(self, endpoint: str) -> Peer | None:
        """The peer at ``endpoint``, or None."""
        with self._lock:
            return self._peers.get(endpoint)

    def __len__(self) -> int:
        return len(self._peers)

    def add(self, endpoint: str, timeout: float, offload: bool, news: bool) -> None:
        """Greet the manager serving at ``endpoint`` and keep it as a peer (see
        :meth:`BlockManager.add_peer <kvblocks.pool.manager.BlockManager.add_peer>`).

        Raises:
            PeerError: no answer within ``timeout``, or another protocol version.
            ConfigMismatchError: the peer keeps blocks of another shape.
            InvalidArgumentError: ``endpoint`` is a peer already, or ``offload`` to a peer
                that does not store other workers' blocks.
        """
        if self.get(endpoint) is not None:
            raise InvalidArgumentError("endpoint", f"{endpoint!r} is a peer already")
        client = PeerClient(endpoint, timeout)
        try:
            peer = self._connect(client, offload, news)
        except BaseException:
            client.close()
            raise
        with self._lock:
            self._peers[endpoint] = peer
            if self._asking is None:
                self._asking = ThreadPoolExecutor(PEER_THREADS, "kvblocks-peers")

    def remove(self, endpoint: str) -> None:
        """Stop asking the peer at ``endpoint`` and close what is kept of it.

        Raises:
            InvalidArgumentError: it is not a peer.
        """
        with self._lock:
            peer = self._peers.pop(endpoint, None)
        if peer is None:
            raise InvalidArgumentError(
                "endpoint", f"{endpoint!r} is not a peer; have {self.endpoints}"
            )
        self._forget(peer)

    def close(self) -> None:
        """Send the releases still queued, then remove every peer."""
        if self._asking is not None:
            self._asking.shutdown(wait=True)
            self._asking = None
        for endpoint in self.endpoints:
            self.remove(endpoint)

    def prefixes(self, hashes: list[int]) -> dict[str, int | None]:
        """Per peer, how many of ``hashes`` (from the first) its news says it caches; None
        where unknown or not followed."""
        with self._lock:
            peers = list(self._peers.items())
        return {e: None if p.index is None else p.index.prefix(hashes) for e, p in peers}

    def offload_targets(self) -> list[Peer]:
        """The peers added with ``offload``."""
        with self._lock:
            return [p for p in self._peers.values() if p.offload]

    def lease_longest(self, hashes: list[int], ask_peer: str | None) -> tuple[Peer, Lease] | None:
        """The longest non-empty lease of a prefix of ``hashes`` any peer grants (the first
        peer's on a tie). Only the peers whose news says they cache the longest prefix are
        asked, those whose news is unknown, and ``ask_peer``; they are asked at once and the
        others let go of their leases. Peers that failed a moment ago are not asked."""
        now = time.monotonic()
        with self._lock:
            ready = [(e, p) for e, p in self._peers.items() if p.retry_at <= now]
        known = {e: None if p.index is None else p.index.prefix(hashes) for e, p in ready}
        longest = max((n for n in known.values() if n is not None), default=0)
        asked = [
            (e, p)
            for e, p in ready
            if e == ask_peer or known[e] is None or (longest and known[e] == longest)
        ]
        self._metrics.record_peer_requests(len(asked), len(ready) - len(asked))
        if not asked:
            return None
        if len(asked) == 1:
            answers = [self._lease_from(*asked[0], hashes)]
        else:
            answers = list(self._asking.map(lambda ep: self._lease_from(*ep, hashes), asked))
        granted = [a for a in answers if a is not None and a[1].block_ids]
        best = max(granted, key=lambda a: len(a[1].block_ids), default=None)
        for answer in answers:
            if answer is not None and answer is not best:
                self.let_go_later(*answer)
        return best

    def push(
        self,
        blocks: Sequence[int],
        chains: Sequence[BlockChain],
        write: Callable[[Peer, list[int], list[int]], None],
    ) -> None:
        """Offer the manager's G2 ``blocks`` (of ``chains``) to every offload peer: a
        reservation of those its news does not say it caches, ``write(peer, src, dst)`` of the
        blocks it reserved (one NIXL WRITE), a commit. A peer that fails is left alone for a
        while; its reservation is let go of."""
        now = time.monotonic()
        hashes = [c.seq_hash for c in chains]
        for peer in self.offload_targets():
            if peer.retry_at > now:
                continue
            todo = peer.lacks(hashes)
            if not todo:
                continue
            lease = None
            try:
                lease = peer.client.reserve([chains[i] for i in todo], PEER_LEASE_S)
                offered = [blocks[i] for i in todo]
                pairs = [(b, r) for b, r in zip(offered, lease.block_ids, strict=True) if r >= 0]
                write(peer, [b for b, _ in pairs], [r for _, r in pairs])
                peer.client.commit(lease)
            except KvBlocksError as exc:
                self.failed(peer, exc)
                if lease is not None:  # drop the reservation now rather than when it lapses
                    self.let_go(peer, lease)

    def let_go_later(self, peer: Peer, lease: Lease) -> None:
        """Release ``lease`` from a background thread."""
        self._asking.submit(self.let_go, peer, lease)

    def let_go(self, peer: Peer, lease: Lease) -> None:
        """Release ``lease`` now (a peer that does not answer lets it go when it expires)."""
        try:
            peer.client.release(lease)
        except PeerError as exc:
            self.failed(peer, exc)

    def failed(self, peer: Peer, exc: BaseException) -> None:
        """``peer`` failed: leave it alone for :data:`PEER_RETRY_S` seconds."""
        log.warning(
            "peer %s: %s; not asked again for %s s", peer.client.endpoint, exc, PEER_RETRY_S
        )
        peer.retry_at = time.monotonic() + PEER_RETRY_S

    def _connect(self, client: PeerClient, offload: bool, news: bool) -> Peer:
        """Say hello to ``client``'s server, check its block shape (and that it stores blocks,
        for ``offload``) and import its G2."""
        info = client.hello()
        difference = self._shape.difference(info.shape)
        if difference is not None:
            raise ConfigMismatchError(
                "endpoint", f"{client.endpoint} keeps blocks of another shape ({difference})"
            )
        if offload and not info.stores:
            raise InvalidArgumentError(
                "offload",
                f"{client.endpoint} does not store other workers' blocks (serve there with"
                " stores=True)",
            )
        handle = self._transfer.import_layout(SerializedLayout.from_bytes(info.layout))
        try:
            index = client.follow(info) if news else None
            if index is not None and index.prefix([]) is None:
                log.warning(
                    "no news from %s at %s within %s s: it is asked on every local miss until"
                    " its news is heard",
                    client.endpoint,
                    info.news,
                    client.timeout,
                )
            return Peer(client, handle, info.server, index, offload)
        except BaseException:
            self._transfer.release_layout(handle)
            raise

    def _lease_from(
        self, endpoint: str, peer: Peer, hashes: list[int]
    ) -> tuple[Peer, Lease] | None:
        """One peer's lease; a peer that restarted since its hello is greeted again (its G2
        imported anew) and asked once more. None if it fails."""
        try:
            lease = peer.client.lease(hashes, PEER_LEASE_S)
            if lease.server == peer.server:
                return peer, lease
            self.let_go(peer, lease)
            fresh = self._connect(peer.client, peer.offload, peer.index is not None)
            with self._lock:
                if self._peers.get(endpoint) is peer:
                    self._peers[endpoint] = fresh
            if peer.index is not None:
                peer.index.close()
            self._transfer.release_layout(peer.handle)
            return fresh, fresh.client.lease(hashes, PEER_LEASE_S)
        except KvBlocksError as exc:
            self.failed(self.get(endpoint) or peer, exc)
            return None

    def _forget(self, peer: Peer) -> None:
        """Close what is kept of a peer."""
        if peer.index is not None:
            peer.index.close()
        peer.client.close()
        self._transfer.release_layout(peer.handle)
