"""Sharing cached blocks between workers: the conversation behind tier G4.

A worker serves the blocks cached in its G2 tier (:meth:`BlockManager.serve
<kvblocks.pool.BlockManager.serve>`); a worker that adds it as a peer (:meth:`BlockManager.add_peer
<kvblocks.pool.BlockManager.add_peer>`) asks it for the blocks of a prefix that no local tier
holds and reads them into its own G2 with one NIXL READ; a server that stores blocks for others
also takes the blocks a peer offloads to it, written with one NIXL WRITE. This module is the
conversation between the two: a :class:`BlockServer` on the serving side, a :class:`PeerClient`
per peer on the other. It needs the ``events`` extra (pyzmq, msgpack).

Requests and replies are msgpack arrays over ZMQ (a REQ socket per peer, one ROUTER socket on
the serving side), one reply per request::

    ["hello", version]          -> ["ok", version, server, shape, layout, stores, news]
    ["holds"]                   -> ["ok", seq, hashes]
    ["lease", hashes, seconds]  -> ["ok", lease_id, block_ids, server]
    ["release", lease_id]       -> ["ok"]
    ["reserve", chains, seconds] -> ["ok", lease_id, block_ids, server]   (a server that stores)
    ["commit", lease_id]        -> ["ok"]
    anything else               -> ["error", message]

``server`` is a random 64-bit id the server drew when it started: a client that sees another
one in a lease than in its hello is talking to a restarted server and must say hello again
(the layout it imported describes memory that is gone). ``shape`` is the server's
:class:`BlockShape` as a map, ``layout`` the bytes of its G2 layout's
:class:`~kvblocks.transfer.SerializedLayout` (NIXL metadata included). A lease holds
the longest prefix of ``hashes`` that the server's G2 caches (``block_ids`` in prefix order,
possibly none; ``lease_id`` 0 then) so that no eviction rewrites those blocks while the client
reads them; the server lets them go on ``release`` or after ``seconds`` (at most
:data:`MAX_LEASE_S`), whichever comes first.

A reservation is the write side: ``chains`` are ``[hash, parent, token_ids]`` of blocks a peer
offers (the parent hash and tokens are what the server's KV events announce); ``block_ids``
has, per chain, an empty G2 block held for the peer to write, or -1 where the server caches
that hash already or has no room. ``commit`` registers the written blocks under their hashes;
``release`` or the end of ``seconds`` drops them unregistered, so a peer that fails halfway
leaves nothing half written findable. ``stores`` in hello says whether the server takes them.

``news`` in hello is the endpoint where the server announces every change of its G2, and
``holds`` a snapshot of it (every hash cached as of change ``seq`` or later): see
:mod:`kvblocks.pool.peer_index`, which keeps a client's view of each peer current so that a
lookup asks only the peers that hold what it misses.

Peers are trusted: anyone who reaches the endpoint can read the served blocks.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Protocol

from kvblocks.errors import BackendUnavailableError, InvalidArgumentError, PeerError
from kvblocks.layout import dtype_name
from kvblocks.pool.config import BlockManagerConfig
from kvblocks.pool.peer_index import BEAT_S, Announcer, PeerIndex

log = logging.getLogger("kvblocks.pool")

#: The protocol version; a peer speaking another one is refused by name.
VERSION = 2
#: The longest a server holds leased blocks for a client that never releases them, seconds.
MAX_LEASE_S = 60.0
#: How often the server's thread looks for expired leases, seconds.
_POLL_S = 0.05


def _u64(value: int) -> bool:
    return 0 <= value < 2**64


def _zmq_msgpack():
    try:
        import msgpack
        import zmq
    except ImportError:
        raise BackendUnavailableError(
            "pyzmq and msgpack are needed to share blocks: pip install 'kvblocks[events]'"
        ) from None
    return zmq, msgpack


@dataclass(frozen=True)
class BlockShape:
    """What two workers must agree on to share blocks: the block's dims and element type
    (sequence hashes also depend on ``block_size``)."""

    num_layers: int
    outer_dim: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @classmethod
    def of(cls, config: BlockManagerConfig) -> BlockShape:
        return cls(
            config.num_layers,
            config.outer_dim,
            config.block_size,
            config.num_kv_heads,
            config.head_dim,
            dtype_name(config.dtype),
        )

    @classmethod
    def from_wire(cls, value: object) -> BlockShape:
        names = [f.name for f in fields(cls)]
        if not isinstance(value, dict) or sorted(value) != sorted(names):
            raise PeerError(f"the peer sent a block shape without the fields {names}: {value!r}")
        return cls(**value)

    def difference(self, other: BlockShape) -> str | None:
        """The first field in which ``other`` differs, as ``"field: mine vs other"``."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                return f"{f.name}: {mine!r} here, {theirs!r} at the peer"
        return None


@dataclass(frozen=True)
class BlockChain:
    """A block offered to a peer: its hash, the hash before it (None at a sequence's start)
    and its tokens."""

    seq_hash: int
    parent: int | None
    token_ids: tuple[int, ...]

    def to_wire(self) -> list:
        return [self.seq_hash, self.parent, list(self.token_ids)]

    @classmethod
    def from_wire(cls, value: object) -> BlockChain:
        """Raises InvalidArgumentError for anything but ``[u64, u64 | None, [int, ...]]``."""
        match value:
            case [int(h), None | int() as parent, list(tokens)] if (
                _u64(h)
                and (parent is None or _u64(parent))
                and all(isinstance(t, int) for t in tokens)
            ):
                return cls(h, parent, tuple(tokens))
        raise InvalidArgumentError("chains", f"must be [hash, parent, tokens], got {value!r:.100}")


@dataclass(frozen=True)
class Lease:
    """Blocks a server holds for one client: ``block_ids`` in the server's G2, in the order of
    the hashes asked for (for a reservation, one per chain, -1 where none was reserved).
    ``lease_id`` 0 is an empty lease (nothing to release); ``server`` is the id of the server
    that granted it."""

    lease_id: int
    block_ids: tuple[int, ...]
    server: int


@dataclass(frozen=True)
class PeerInfo:
    """A server's answer to hello: its id, its block shape, its serialized G2 layout, whether
    it stores blocks other workers offload to it, and where it announces its G2's changes."""

    server: int
    shape: BlockShape
    layout: bytes
    stores: bool
    news: str


class ServedTier(Protocol):
    """The G2 tier a :class:`BlockServer` serves (its BlockManager's)."""

    def cached(self) -> list[int]:
        """The hashes of every block cached (a snapshot)."""

    def lease(self, hashes: list[int]) -> list[int]:
        """Hold the longest prefix of ``hashes`` cached; its block ids."""

    def release(self, blocks: list[int]) -> None:
        """Let leased blocks go."""

    def reserve(self, chains: list[BlockChain]) -> list[int]:
        """Per chain, an empty block held to be written, or -1 (cached already, or no room)."""

    def commit(self, blocks: list[int], chains: list[BlockChain]) -> None:
        """Register written reserved blocks under their chains' hashes and let them go."""

    def abandon(self, blocks: list[int]) -> None:
        """Let reserved blocks go unregistered."""


@dataclass
class _Held:
    """A lease (``chains`` None) or a reservation, and when the server lets it go."""

    block_ids: list[int]
    deadline: float
    chains: list[BlockChain] | None = None


class BlockServer:
    """Answers peers' requests for the blocks of one G2 tier, from a background thread.

    Args:
        endpoint: where the ROUTER socket binds (``"tcp://*:5600"``; a port of ``*`` picks a
            free one: read :attr:`endpoint`).
        shape: the served blocks' shape.
        layout: the served G2 layout's SerializedLayout, as bytes.
        tier: the G2 tier the requests act on.
        stores: take reservations (blocks peers offload here); refused otherwise.
        news_endpoint: where the tier's changes are announced (:meth:`announce`); by default
            a free port on the host of ``endpoint`` (for ``ipc://`` and ``inproc://``, the
            same name with ``.news`` after it).

    Raises:
        InvalidArgumentError: ``endpoint`` or ``news_endpoint`` cannot be bound.
        BackendUnavailableError: pyzmq or msgpack is missing.
    """

    def __init__(
        self,
        endpoint: str,
        shape: BlockShape,
        layout: bytes,
        tier: ServedTier,
        stores: bool = False,
        news_endpoint: str | None = None,
    ) -> None:
        zmq, self._msgpack = _zmq_msgpack()
        self._tier = tier
        self._leases: dict[int, _Held] = {}
        self._ids = itertools.count(1)
        self._socket = zmq.Context.instance().socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(0)
            raise InvalidArgumentError("endpoint", f"cannot bind {endpoint!r}: {exc}") from None
        #: The endpoint bound, with the port chosen.
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        server = secrets.randbits(64)
        try:
            news = news_endpoint or _news_endpoint_beside(endpoint)
            self._news = Announcer(news, server, zmq, self._msgpack)
        except InvalidArgumentError:
            self._socket.close(0)
            raise
        #: What every peer that says hello is told (with a fresh server id).
        self.info = PeerInfo(server, shape, layout, stores, self._news.endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kvblocks-peers", daemon=True)
        self._thread.start()

    @property
    def num_leases(self) -> int:
        """Leases held now."""
        return len(self._leases)

    def announce(self, changes: Sequence[tuple[bool, Sequence[int]]]) -> None:
        """Announce ``(stored, hashes)`` changes of the served tier, in the order they
        happened (after they happened: a snapshot taken meanwhile may hold them already)."""
        self._news.announce(changes)

    def close(self) -> None:
        """Stop answering and announcing, and let every held lease go."""
        self._stop.set()
        self._thread.join()
        self._news.close()

    def _serve(self) -> None:
        next_beat = 0.0
        try:
            while not self._stop.is_set():
                if time.monotonic() >= next_beat:
                    self._news.beat()
                    next_beat = time.monotonic() + BEAT_S
                if self._socket.poll(int(_POLL_S * 1000)):
                    frames = self._socket.recv_multipart()
                    if len(frames) != 3:  # not a REQ socket's request: nobody to answer
                        log.warning("a peer sent %d frames, not 3; ignored", len(frames))
                        continue
                    client, empty, payload = frames
                    reply = self._msgpack.packb(self._answer(payload), use_bin_type=True)
                    self._socket.send_multipart((client, empty, reply))
                self._expire(time.monotonic())
        finally:
            self._expire(float("inf"))
            self._socket.close(0)

    def _expire(self, now: float) -> None:
        for lease_id in [i for i, held in self._leases.items() if held.deadline <= now]:
            self._let_go(self._leases.pop(lease_id))

    def _let_go(self, held: _Held) -> None:
        if held.chains is None:
            self._tier.release(held.block_ids)
        else:
            self._tier.abandon([b for b in held.block_ids if b >= 0])

    def _answer(self, payload: bytes) -> list:
        try:
            request = self._msgpack.unpackb(payload, raw=False)
        except Exception:
            return ["error", "the request is not msgpack"]
        try:
            match request:
                case ["hello", int(version)]:
                    if version != VERSION:
                        problem = f"protocol version {version}; this worker speaks {VERSION}"
                        return ["error", problem]
                    info = self.info
                    shape = asdict(info.shape)
                    return ["ok", VERSION, info.server, shape, info.layout, info.stores, info.news]
                case ["holds"]:
                    seq = self._news.seq  # first: every change up to it is in the tier now
                    return ["ok", seq, self._tier.cached()]
                case ["lease", list(hashes), int(seconds) | float(seconds)]:
                    return self._grant(hashes, seconds)
                case ["reserve", list(chains), int(seconds) | float(seconds)]:
                    return self._reserve(chains, seconds)
                case ["commit", int(lease_id)]:
                    return self._commit(lease_id)
                case ["release", int(lease_id)]:
                    held = self._leases.pop(lease_id, None)
                    if held is not None:
                        self._let_go(held)
                    return ["ok"]
            return ["error", f"unknown request {request!r:.100}"]
        except InvalidArgumentError as exc:
            return ["error", str(exc)]
        except Exception as exc:  # one bad request must not stop the server
            log.exception("answering a peer failed")
            return ["error", f"{type(exc).__name__}: {exc}"]

    def _grant(self, hashes: list, seconds: float) -> list:
        if not all(isinstance(h, int) and _u64(h) for h in hashes):
            return ["error", "hashes must be unsigned 64-bit ints"]
        if not seconds > 0:
            return ["error", f"a lease must last > 0 seconds, got {seconds}"]
        return self._hold(self._tier.lease(hashes), seconds, None)

    def _reserve(self, wire: list, seconds: float) -> list:
        if not self.info.stores:
            return ["error", "this worker does not store other workers' blocks"]
        if not seconds > 0:
            return ["error", f"a reservation must last > 0 seconds, got {seconds}"]
        chains = [BlockChain.from_wire(c) for c in wire]
        return self._hold(self._tier.reserve(chains), seconds, chains)

    def _commit(self, lease_id: int) -> list:
        held = self._leases.get(lease_id)
        if held is None or held.chains is None:
            return ["error", f"no reservation {lease_id} (it may have expired)"]
        del self._leases[lease_id]
        kept = [(b, c) for b, c in zip(held.block_ids, held.chains, strict=True) if b >= 0]
        self._tier.commit([b for b, _ in kept], [c for _, c in kept])
        return ["ok"]

    def _hold(self, blocks: list[int], seconds: float, chains: list[BlockChain] | None) -> list:
        if not any(b >= 0 for b in blocks):
            return ["ok", 0, blocks, self.info.server]
        lease_id = next(self._ids)
        deadline = time.monotonic() + min(seconds, MAX_LEASE_S)
        self._leases[lease_id] = _Held(blocks, deadline, chains)
        return ["ok", lease_id, blocks, self.info.server]


class PeerClient:
    """Requests to one :class:`BlockServer`. Safe to call from several threads (requests are
    sent one at a time).

    Args:
        endpoint: the server's endpoint (``"tcp://host:5600"``).
        timeout: seconds to wait for each reply.

    Every request raises :class:`PeerError` when no reply comes within ``timeout`` or the
    server answers with an error.
    """

    def __init__(self, endpoint: str, timeout: float = 1.0) -> None:
        self._zmq, self._msgpack = _zmq_msgpack()
        if not isinstance(endpoint, str) or "://" not in endpoint:
            raise InvalidArgumentError("endpoint", f"must be a ZMQ endpoint, got {endpoint!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise InvalidArgumentError("timeout", f"must be > 0 seconds, got {timeout!r}")
        self.endpoint = endpoint
        self.timeout = float(timeout)
        self._lock = threading.Lock()
        self._socket = None

    def hello(self) -> PeerInfo:
        """The server's id, block shape, G2 layout, whether it stores, and its news endpoint
        (reachable from here: a wildcard host is replaced by this client's host for it)."""
        _, version, server, shape, layout, stores, news = self._request(["hello", VERSION], 7)
        if version != VERSION:
            raise PeerError(f"{self.endpoint} speaks protocol version {version}, not {VERSION}")
        news = _reachable(news, self.endpoint)
        return PeerInfo(server, BlockShape.from_wire(shape), layout, bool(stores), news)

    def holds(self) -> tuple[int, list[int]]:
        """A snapshot of the server's G2: ``(seq, hashes)``, every hash cached as of its
        change ``seq`` or later."""
        _, seq, hashes = self._request(["holds"], 3)
        return seq, hashes

    def lease(self, hashes: Sequence[int], seconds: float) -> Lease:
        """Hold the longest prefix of ``hashes`` the server caches, for at most ``seconds``."""
        request = ["lease", list(hashes), float(seconds)]
        _, lease_id, block_ids, server = self._request(request, 4)
        return Lease(lease_id, tuple(block_ids), server)

    def reserve(self, chains: Sequence[BlockChain], seconds: float) -> Lease:
        """Empty blocks of the server's G2 held for writing ``chains`` (-1 where none)."""
        request = ["reserve", [c.to_wire() for c in chains], float(seconds)]
        _, lease_id, block_ids, server = self._request(request, 4)
        return Lease(lease_id, tuple(block_ids), server)

    def follow(self, info: PeerInfo) -> PeerIndex:
        """An index of the server's G2, kept current from its news (``info`` from hello).
        Waits up to ``timeout`` for the first message, then takes a snapshot."""
        return PeerIndex(info.news, info.server, self.holds, self.timeout, self._zmq, self._msgpack)

    def commit(self, lease: Lease) -> None:
        """Register a reservation's written blocks at the server."""
        if lease.lease_id:
            self._request(["commit", lease.lease_id], 1)

    def release(self, lease: Lease) -> None:
        """Let a lease go, or drop a reservation unregistered."""
        if lease.lease_id:
            self._request(["release", lease.lease_id], 1)

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close(0)
                self._socket = None

    def _request(self, request: list, length: int) -> list:
        """Send ``request``; the reply, an ``"ok"`` array of ``length`` items."""
        zmq = self._zmq
        with self._lock:
            if self._socket is None:
                self._socket = zmq.Context.instance().socket(zmq.REQ)
                self._socket.setsockopt(zmq.LINGER, 0)
                self._socket.connect(self.endpoint)
            self._socket.send(self._msgpack.packb(request, use_bin_type=True))
            if not self._socket.poll(int(self.timeout * 1000)):
                self._socket.close(0)  # a REQ socket that missed its reply cannot send again
                self._socket = None
                raise PeerError(f"{self.endpoint} did not answer within {self.timeout} s")
            payload = self._socket.recv()
        try:
            reply = self._msgpack.unpackb(payload, raw=False)
        except Exception:
            raise PeerError(f"{self.endpoint} sent a reply that is not msgpack") from None
        if isinstance(reply, list) and len(reply) == 2 and reply[0] == "error":
            raise PeerError(f"{self.endpoint}: {reply[1]}")
        if not isinstance(reply, list) or len(reply) != length or reply[0] != "ok":
            problem = f"a reply this protocol does not know: {reply!r:.200}"
            raise PeerError(f"{self.endpoint} sent {problem}")
        return reply


#: Hosts a socket binds to that no client can connect to.
_WILDCARD_HOSTS = ("*", "0.0.0.0", "[::]", "::")


def _news_endpoint_beside(endpoint: str) -> str:
    """Where a server bound at ``endpoint`` announces its changes by default."""
    transport, _, address = endpoint.partition("://")
    if transport == "tcp":
        host, _, _ = address.rpartition(":")
        return f"tcp://{host}:*"
    if transport in ("ipc", "inproc"):
        return f"{endpoint}.news"
    raise InvalidArgumentError(
        "news_endpoint", f"cannot be derived from {endpoint!r}: name one for this transport"
    )


def _reachable(advertised: str, via: str) -> str:
    """``advertised`` (a server's own endpoint) with a wildcard host replaced by the host of
    ``via``, the endpoint this client reaches the server at."""
    transport, _, address = advertised.partition("://")
    host, _, port = address.rpartition(":")
    if transport != "tcp" or host not in _WILDCARD_HOSTS:
        return advertised
    via_host, _, _ = via.partition("://")[2].rpartition(":")
    return f"tcp://{via_host}:{port}"
