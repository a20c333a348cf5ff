"""Reading workers' KV events over ZMQ: the other side of
:class:`~kvblocks.pool.publishers.ZmqPublisher` (and of vLLM's ZMQ publisher, which speaks the
same protocol).

A :class:`ZmqSubscriber` follows any number of workers from one background thread and hands each
worker's batches to an :class:`~kvblocks.pool.event_sink.EventSink` in the order they were sent,
once each. A worker's messages are ``[topic, seq, payload]`` with ``seq`` counting batches from
0; with the worker's replay endpoint (a ROUTER socket that answers an 8-byte start seq with
every batch it kept from there, then ``seq = -1``) the subscriber

- reads the batches sent before it came (the publisher keeps the last ``buffer_batches``),
- fills a gap in ``seq`` (a batch dropped on the way, or sent before the subscription was live),
- asks again after :data:`CHECK_S` seconds without a message, so that a dropped *last* batch is
  found too.

A worker that starts over (a restarted process counts its batches from 0 again) is found by a
``seq`` that goes back where no replay can explain it: what came before is lost (the restarted
worker's cache is new too), and the new batches are read from the start.

A worker whose replay endpoint has not answered for ``gone_after`` seconds (and that sent
nothing meanwhile) is *gone*: a process that died without closing. Its batches count as lost
once, so an index stops routing to blocks it no longer holds; it is asked again every
``check_every`` seconds, and what it sends when it is back is read as usual. Needs the
``events`` extra.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from kvblocks.checks import seconds_or_none
from kvblocks.errors import BackendUnavailableError, InvalidArgumentError, SerializationError
from kvblocks.pool.event_sink import (
    GONE_AFTER_S,
    EventSink,
    FollowState,
    tell_sink,
    warn_out_of_order,
)
from kvblocks.pool.publishers import REPLAY_END, decode_batch

log = logging.getLogger(__name__)

#: Seconds without a message after which a worker's replay endpoint is asked for what is new.
CHECK_S = 1.0
#: Seconds a replay may take before its batches count as lost.
REPLAY_TIMEOUT_S = 5.0
#: Seconds the subscriber's thread waits on its sockets before it looks at new requests.
_POLL_S = 0.05
#: Messages a SUB socket queues before it drops (a drop is found as a gap).
_HIGH_WATER = 100_000


@dataclass
class _Follow:
    """One followed worker, owned by the subscriber's thread.

    While a replay runs (``dealer`` set) the SUB socket is not read: its messages wait in it,
    and the one that showed a gap waits in ``held``. The SUB socket may then repeat batches a
    replay delivered, until it brings a new one: ``echoes`` keeps a digest of each replayed
    payload by seq till then. A ``seq`` that goes back with another payload means the worker
    started over.
    """

    worker: str
    endpoint: str
    replay_endpoint: str | None
    socket: object
    next_seq: int | None = None
    heard: float = 0.0
    answered: float = field(default_factory=time.monotonic)
    gone: bool = False
    dealer: object | None = None
    deadline: float = 0.0
    held: tuple[int, bytes] | None = None
    echoes: dict[int, int] = field(default_factory=dict)
    waiter: queue.Queue | None = None
    batches: int = 0
    replayed: int = 0
    lost: int = 0
    bad: int = 0

    def state(self) -> FollowState:
        return FollowState(
            self.worker,
            self.endpoint,
            self.replay_endpoint,
            self.next_seq,
            self.batches,
            self.replayed,
            self.lost,
            self.bad,
            self.gone,
        )


class ZmqSubscriber:
    """Follows workers' KV events over ZMQ in a background thread (see the module docstring).

    Args:
        sink: gets every worker's batches, in order, and word of lost ones.
        topic: the first frame of the workers' messages (``ZmqPublisher`` 's default
            ``"kv-events"``; vLLM's default is ``""``); messages of other topics are ignored.
        check_every: seconds without a message after which a worker's replay endpoint is
            asked for what is new.
        gone_after: seconds without an answer from a worker's replay endpoint (and without a
            message) after which the worker is gone and its batches count as lost; ``None``:
            never. Workers followed without a replay endpoint are never gone.

    Raises:
        BackendUnavailableError: pyzmq or msgpack is not installed.
        InvalidArgumentError: ``check_every`` or ``gone_after`` is not a positive number.
    """

    def __init__(
        self,
        sink: EventSink,
        topic: str = "kv-events",
        check_every: float = CHECK_S,
        gone_after: float | None = GONE_AFTER_S,
    ) -> None:
        try:
            import msgpack  # noqa: F401 (decode_batch needs it)
            import zmq
        except ImportError:
            raise BackendUnavailableError(
                "pyzmq and msgpack are needed: pip install 'kvblocks[events]'"
            ) from None
        if not check_every > 0:
            raise InvalidArgumentError("check_every", f"must be > 0 seconds, got {check_every!r}")
        self._gone_after = seconds_or_none(gone_after, "gone_after")
        self._zmq = zmq
        self._sink = sink
        self._topic = topic.encode()
        self._check_every = check_every
        self._requests: queue.Queue = queue.Queue()
        self._follows: dict[str, _Follow] = {}
        self._states_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller = zmq.Poller()
        self._thread = threading.Thread(target=self._run, name="kvblocks-zmq-sub", daemon=True)
        self._thread.start()

    def follow(self, worker: str, endpoint: str, replay_endpoint: str | None = None) -> None:
        """Start following ``worker``, whose events come from ``endpoint`` and its replays,
        when given, from ``replay_endpoint``. Returns once connected; with a replay endpoint,
        once the batches the worker keeps were delivered (or the replay timed out).

        Raises:
            InvalidArgumentError: ``worker`` is followed already, or an endpoint is not one.
        """
        if not isinstance(worker, str) or not worker:
            raise InvalidArgumentError("worker", f"must be a non-empty str, got {worker!r}")
        self._call(self._start, worker, endpoint, replay_endpoint)

    def unfollow(self, worker: str) -> None:
        """Stop following ``worker`` (what it sent stays with the sink).

        Raises:
            InvalidArgumentError: ``worker`` is not followed.
        """
        self._call(self._end, worker)

    def states(self) -> list[FollowState]:
        """How following each worker goes, by name."""
        with self._states_lock:
            return [f.state() for _, f in sorted(self._follows.items())]

    def close(self) -> None:
        """Stop the thread and close the sockets (idempotent)."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> ZmqSubscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # The thread ---------------------------------------------------------------------------------

    def _call(self, function, *args) -> None:
        """Run ``function(done, *args)`` in the subscriber's thread; raise what it puts in
        ``done`` (None: it went well)."""
        if self._stop.is_set():
            raise InvalidArgumentError("subscriber", "is closed")
        done: queue.Queue = queue.Queue(maxsize=1)
        self._requests.put((function, args, done))
        while True:
            try:
                error = done.get(timeout=_POLL_S * 10)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise InvalidArgumentError("subscriber", "its thread ended") from None
        if error is not None:
            raise error

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._serve_requests()
                ready = dict(self._poller.poll(int(_POLL_S * 1000)))
                now = time.monotonic()
                for follow in list(self._follows.values()):
                    if follow.dealer is not None:
                        if follow.dealer in ready:
                            self._read_replay(follow)
                        elif now > follow.deadline:
                            self._no_answer(follow, now)
                    elif follow.socket in ready:
                        self._receive(follow)
                    elif follow.replay_endpoint and now - follow.heard > self._check_every:
                        self._begin_replay(follow)
        finally:
            for follow in self._follows.values():
                self._close(follow)
            self._serve_requests()  # callers waiting now are told it closed

    def _serve_requests(self) -> None:
        while True:
            try:
                function, args, done = self._requests.get_nowait()
            except queue.Empty:
                return
            if self._stop.is_set():
                done.put(InvalidArgumentError("subscriber", "is closed"))
                continue
            try:
                function(done, *args)
            except InvalidArgumentError as exc:
                done.put(exc)

    def _start(self, done, worker: str, endpoint: str, replay_endpoint: str | None) -> None:
        zmq = self._zmq
        if worker in self._follows:
            raise InvalidArgumentError("worker", f"{worker!r} is followed already")
        socket = zmq.Context.instance().socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, _HIGH_WATER)
        socket.setsockopt(zmq.SUBSCRIBE, self._topic)
        try:
            socket.connect(endpoint)
        except zmq.ZMQError as exc:
            socket.close(0)
            raise InvalidArgumentError(
                "endpoint", f"cannot connect to {endpoint!r}: {exc}"
            ) from None
        follow = _Follow(worker, endpoint, replay_endpoint, socket)
        self._poller.register(socket, zmq.POLLIN)
        if replay_endpoint is not None:
            follow.next_seq = 0
            try:
                self._begin_replay(follow)
            except InvalidArgumentError:
                self._close(follow)
                raise
            follow.waiter = done
        else:
            done.put(None)
        with self._states_lock:
            self._follows[worker] = follow

    def _end(self, done, worker: str) -> None:
        follow = self._follows.get(worker)
        if follow is None:
            raise InvalidArgumentError("worker", f"{worker!r} is not followed")
        self._close(follow)
        with self._states_lock:
            del self._follows[worker]
        done.put(None)

    def _close(self, follow: _Follow) -> None:
        if follow.dealer is not None:
            self._poller.unregister(follow.dealer)
            follow.dealer.close(0)
        else:
            self._poller.unregister(follow.socket)
        follow.socket.close(0)
        if follow.waiter is not None:
            follow.waiter.put(None)

    def _receive(self, follow: _Follow) -> None:
        """Deliver what waits on ``follow`` 's SUB socket; a gap starts a replay (or, with no
        replay endpoint, is lost)."""
        zmq = self._zmq
        while True:
            try:
                frames = follow.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._heard_from(follow)
            if len(frames) != 3 or frames[0] != self._topic or len(frames[1]) != 8:
                self._drop(follow, f"a message of {len(frames)} frames")
                continue
            seq, payload = int.from_bytes(frames[1], "big"), frames[2]
            if follow.next_seq is None:
                follow.next_seq = seq
            if seq < follow.next_seq:
                if follow.echoes.get(seq) == hash(payload):
                    continue
                self._started_over(follow, seq)
            follow.echoes.clear()  # the SUB socket brought a new batch: no repeats after it
            if seq > follow.next_seq and follow.replay_endpoint is not None:
                follow.held = (seq, payload)
                self._begin_replay(follow)
                return
            self._take(follow, seq, payload, replayed=False)

    def _begin_replay(self, follow: _Follow) -> None:
        """Ask the replay endpoint for every batch from ``next_seq`` on; until it answers,
        the SUB socket is not read."""
        zmq = self._zmq
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(follow.replay_endpoint)
        except zmq.ZMQError as exc:
            dealer.close(0)
            raise InvalidArgumentError(
                "replay_endpoint", f"cannot connect to {follow.replay_endpoint!r}: {exc}"
            ) from None
        dealer.send_multipart((b"", follow.next_seq.to_bytes(8, "big")))
        self._poller.unregister(follow.socket)
        self._poller.register(dealer, zmq.POLLIN)
        follow.dealer = dealer
        follow.deadline = time.monotonic() + REPLAY_TIMEOUT_S

    def _no_answer(self, follow: _Follow, now: float) -> None:
        """``follow`` 's replay timed out: end it; past ``gone_after`` without a word from
        the worker, it is gone (its batches are lost, once)."""
        silent = now - follow.answered
        gone = self._gone_after is not None and silent > self._gone_after
        if gone and not follow.gone:
            log.warning(
                "%s: no answer from %s for %.0f s: gone; its blocks are forgotten",
                follow.worker,
                follow.replay_endpoint,
                silent,
            )
            with self._states_lock:
                follow.gone = True
            self._lose(follow)
        elif not follow.gone:
            log.warning("no replay from %s in %s s", follow.replay_endpoint, REPLAY_TIMEOUT_S)
        self._end_replay(follow)

    def _heard_from(self, follow: _Follow) -> None:
        """A message or a replay answer came from ``follow`` 's worker."""
        follow.heard = follow.answered = time.monotonic()
        if follow.gone:
            log.warning("%s is back", follow.worker)
            with self._states_lock:
                follow.gone = False

    def _started_over(self, follow: _Follow, seq: int) -> None:
        """``follow`` 's worker sent ``seq`` after batches up to ``next_seq - 1``: it started
        over. What it had is lost; its new batches are read from 0 (from ``seq`` without a
        replay endpoint)."""
        warn_out_of_order(log, follow.worker, follow.next_seq, seq)
        self._lose(follow)
        follow.next_seq = 0 if follow.replay_endpoint is not None else seq

    def _read_replay(self, follow: _Follow) -> None:
        zmq = self._zmq
        while follow.dealer is not None:
            try:
                frames = follow.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._heard_from(follow)
            if len(frames) != 3 or len(frames[1]) != 8:
                self._drop(follow, f"a replay reply of {len(frames)} frames")
                continue
            seq = int.from_bytes(frames[1], "big", signed=True)
            if seq == REPLAY_END:
                self._end_replay(follow)
            elif seq >= follow.next_seq:
                follow.echoes[seq] = hash(frames[2])
                self._take(follow, seq, frames[2], replayed=True)

    def _end_replay(self, follow: _Follow) -> None:
        """Close the replay, read the SUB socket again, starting with the held message."""
        zmq = self._zmq
        self._poller.unregister(follow.dealer)
        follow.dealer.close(0)
        follow.dealer = None
        self._poller.register(follow.socket, zmq.POLLIN)
        follow.heard = time.monotonic()
        if follow.held is not None:
            seq, payload = follow.held
            follow.held = None
            self._take(follow, seq, payload, replayed=False)
        if follow.waiter is not None:
            follow.waiter.put(None)
            follow.waiter = None

    def _take(self, follow: _Follow, seq: int, payload: bytes, replayed: bool) -> None:
        """Deliver batch ``seq`` if it is the next one; one already delivered is dropped, one
        past the next means those between were lost."""
        if seq < follow.next_seq:
            return
        if seq > follow.next_seq:
            warn_out_of_order(log, follow.worker, follow.next_seq, seq)
            self._lose(follow)
        follow.next_seq = seq + 1
        try:
            batch = decode_batch(payload)
        except SerializationError as exc:
            self._drop(follow, str(exc))
            self._lose(follow)
            return
        with self._states_lock:
            follow.batches += 1
            follow.replayed += replayed
        tell_sink(log, self._sink.apply, follow.worker, batch)

    def _lose(self, follow: _Follow) -> None:
        with self._states_lock:
            follow.lost += 1
        tell_sink(log, self._sink.lost, follow.worker)

    def _drop(self, follow: _Follow, why: str) -> None:
        log.warning("dropped a message from %s: %s", follow.worker, why)
        with self._states_lock:
            follow.bad += 1
