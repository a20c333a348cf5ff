"""What each peer's G2 caches, kept current from its news, so that a lookup asks only the
peers that hold the blocks it misses.

A :class:`~kvblocks.pool.sharing.BlockServer` announces every change of the G2 it serves on a
ZMQ PUB socket, its *news* (an :class:`Announcer`): the sequence hashes stored and removed, in
the order of the KV events that said so. Each message is three frames::

    [server, seq, payload]   server: the server's id (from hello), 8 bytes big-endian
                             seq: 8-byte big-endian count of changes, from 1
                             payload: msgpack of [[stored, hashes], ...] (stored: bool)
    [server, seq, b""]       a beat, every BEAT_S seconds: seq is the last change sent
    [server, seq, b"bye"]    the server closes

A client keeps one :class:`PeerIndex` per peer: it starts from a snapshot of the peer's G2
(``["holds"]`` -> ``["ok", seq, hashes]`` through :class:`~kvblocks.pool.sharing.PeerClient`,
every hash cached as of change ``seq`` or later) and applies the changes after it. A change or
a beat whose seq is not the next one expected means changes were missed: it takes a new
snapshot. Applying a change again on a snapshot that already holds it is harmless (each one
sets a hash present or absent), so the snapshot needs no lock against the changes.

A peer that said bye, whose news went silent for :data:`SILENT_S` (gone, restarted on another
port), whose news comes from another server id (restarted on the same port) or whose snapshot
failed is *unknown*: :meth:`PeerIndex.prefix` says None and the peer is asked as if it had no
news (asking it is how a restarted peer is found and greeted again).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from kvblocks.errors import InvalidArgumentError, KvBlocksError

#: Seconds between two beats of an announcer.
BEAT_S = 0.1
#: Seconds without a message after which a peer's index is unknown.
SILENT_S = 2.0
#: The payload of a beat and of the last message of a server.
_BEAT, _BYE = b"", b"bye"
#: Messages a PUB or SUB socket queues before dropping (a dropped change forces a snapshot).
_HIGH_WATER = 100_000

Snapshot = Callable[[], tuple[int, list[int]]]
"""Returns ``(seq, hashes)``: every hash the peer's G2 caches, as of change ``seq`` or later."""


def _u64_frame(value: int) -> bytes:
    return value.to_bytes(8, "big")


class Announcer:
    """The serving side: numbers the changes of a G2 and publishes them (thread-safe).

    Args:
        endpoint: where the PUB socket binds; a port of ``*`` picks a free one.
        server: the id of the server whose tier changes.
        zmq, msgpack: the modules (the caller checked they are installed).

    Raises:
        InvalidArgumentError: ``endpoint`` cannot be bound.
    """

    def __init__(self, endpoint: str, server: int, zmq, msgpack) -> None:
        self._msgpack = msgpack
        self._server = _u64_frame(server)
        self._socket = zmq.Context.instance().socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, _HIGH_WATER)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(0)
            raise InvalidArgumentError(
                "news_endpoint", f"cannot bind {endpoint!r}: {exc}"
            ) from None
        #: The endpoint bound, with the port chosen.
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._lock = threading.Lock()
        self._seq = 0
        self._closed = False

    @property
    def seq(self) -> int:
        """The last change sent."""
        with self._lock:
            return self._seq

    def announce(self, changes: Sequence[tuple[bool, Sequence[int]]]) -> None:
        """Publish ``(stored, hashes)`` changes, in the order they happened, as one message."""
        if not changes:
            return
        payload = self._msgpack.packb([[s, list(h)] for s, h in changes], use_bin_type=True)
        with self._lock:
            self._seq += 1
            self._send(payload)

    def beat(self) -> None:
        """Say which change was the last, so that a client that missed it notices."""
        with self._lock:
            self._send(_BEAT)

    def close(self) -> None:
        """Say bye (waiting up to ``BEAT_S`` for it to leave) and close; what is announced
        after is dropped."""
        with self._lock:
            self._send(_BYE)
            self._closed = True
            self._socket.close(int(BEAT_S * 1000))

    def _send(self, payload: bytes) -> None:
        if not self._closed:
            self._socket.send_multipart((self._server, _u64_frame(self._seq), payload))


class PeerIndex:
    """The hashes one peer's G2 caches, as its news says (thread-safe).

    Args:
        endpoint: the peer's news endpoint.
        server: the id the peer gave in hello; news from another id makes the index unknown.
        snapshot: takes a snapshot of the peer's G2 (a round trip to the peer).
        wait: seconds to wait for the first message (proof that the subscription is live)
            before the first snapshot; without one the index starts unknown.
        zmq, msgpack: the modules (the caller checked they are installed).
    """

    def __init__(
        self, endpoint: str, server: int, snapshot: Snapshot, wait: float, zmq, msgpack
    ) -> None:
        self.endpoint = endpoint
        self._server = _u64_frame(server)
        self._snapshot = snapshot
        self._zmq, self._msgpack = zmq, msgpack
        self._lock = threading.Lock()
        self._hashes: set[int] = set()
        self._seq: int | None = None  # None: unknown, a snapshot is due
        self._heard = 0.0  # monotonic time of the last message
        self._gone = False  # said bye, or another server speaks at the endpoint
        self._closed = False
        self._socket = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, _HIGH_WATER)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.connect(endpoint)
        if self._socket.poll(int(wait * 1000)):
            self.refresh()

    def refresh(self) -> None:
        """Apply the messages received so far (taking a snapshot where changes were missed);
        :meth:`prefix` and :meth:`lacks` do it first."""
        with self._lock:
            self._drain()

    def prefix(self, hashes: Sequence[int]) -> int | None:
        """How many of ``hashes``, from the first, the peer caches; None when unknown."""
        with self._lock:
            if not self._current():
                return None
            n = 0
            for h in hashes:
                if h not in self._hashes:
                    break
                n += 1
            return n

    def lacks(self, hashes: Sequence[int]) -> list[bool] | None:
        """Per hash, whether the peer does not cache it; None when unknown."""
        with self._lock:
            if not self._current():
                return None
            return [h not in self._hashes for h in hashes]

    def close(self) -> None:
        """Stop following the news (the index is unknown from now on)."""
        with self._lock:
            self._closed = True
            self._socket.close(0)

    def _drain(self) -> None:
        zmq = self._zmq
        while not self._closed:
            try:
                server, seq, payload = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._heard = time.monotonic()
            if server != self._server or payload == _BYE:
                self._gone = True
            elif not self._gone:
                self._apply(int.from_bytes(seq, "big"), payload)

    def _current(self) -> bool:
        """Apply what arrived; whether the index is known then."""
        self._drain()
        silent = time.monotonic() - self._heard > SILENT_S
        return not (self._closed or self._gone or self._seq is None or silent)

    def _apply(self, seq: int, payload: bytes) -> None:
        if self._seq is not None and seq <= self._seq:
            return  # a beat, or a change the snapshot holds already
        if self._seq is None or seq != self._seq + 1 or not payload:
            self._resync()
            return
        for stored, hashes in self._msgpack.unpackb(payload, raw=False):
            if stored:
                self._hashes.update(hashes)
            else:
                self._hashes.difference_update(hashes)
        self._seq = seq

    def _resync(self) -> None:
        try:
            seq, hashes = self._snapshot()
        except KvBlocksError:
            self._seq = None
            return
        self._hashes = set(hashes)
        self._seq = seq
