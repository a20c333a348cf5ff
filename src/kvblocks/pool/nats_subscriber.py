"""Reading workers' KV events over NATS: the other side of
:class:`~kvblocks.pool.publishers.NatsPublisher`.

A :class:`NatsSubscriber` reads every worker that publishes on a NATS subject (wildcards
allowed), knowing them by the publisher's worker header (by subject for messages without it),
and hands each worker's batches to an :class:`~kvblocks.pool.event_sink.EventSink` in order.
Core NATS keeps nothing, so there is no replay: a gap in a worker's seq header, or a worker
starting over, is a loss; so is a worker's heartbeat that names a later next seq than the
subscriber has read (its last batches were dropped). A worker that sends heartbeats and has
sent nothing for ``gone_after`` seconds (three heartbeats at least) is *gone*: lost once, and
read as usual when it is heard again. Where the workers publish into a JetStream stream, the
subscriber reads from it what the stream keeps first. Needs the ``events`` extra.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from kvblocks.checks import positive_int, seconds_or_none
from kvblocks.errors import SerializationError, TransferError
from kvblocks.pool.event_sink import (
    GONE_AFTER_S,
    EventSink,
    FollowState,
    tell_sink,
    warn_out_of_order,
)
from kvblocks.pool.nats_link import (
    ALIVE_HEADER,
    NEXT_SEQ_HEADER,
    SEQ_HEADER,
    WORKER_HEADER,
    NatsLink,
    check_stream,
    check_subject,
    ensure_stream,
)
from kvblocks.pool.publishers import decode_batch, require_msgpack

log = logging.getLogger(__name__)

#: Seconds between a NatsSubscriber's looks for workers whose heartbeats stopped (at most).
_SILENCE_CHECK_S = 1.0


@dataclass
class _NatsWorker:
    """One worker heard on the subscribed subject, owned by the NATS loop's thread."""

    worker: str
    subject: str
    next_seq: int | None = None
    heard: float = field(default_factory=time.monotonic)
    alive_every: float | None = None
    gone: bool = False
    batches: int = 0
    lost: int = 0
    bad: int = 0

    def state(self) -> FollowState:
        return FollowState(
            self.worker,
            self.subject,
            None,
            self.next_seq,
            self.batches,
            0,
            self.lost,
            self.bad,
            self.gone,
        )

    def silent_too_long(self, now: float, gone_after: float) -> bool:
        """Whether this worker sends heartbeats and none came for ``gone_after`` seconds (or
        three of its heartbeats' periods, if longer)."""
        if self.alive_every is None or self.gone:
            return False
        return now - self.heard > max(gone_after, 3 * self.alive_every)


class NatsSubscriber:
    """Reads the KV events of every worker publishing on a NATS subject (see the module
    docstring) and hands them to ``sink`` from the connection's thread.

    A worker is known by its messages' ``Kvblocks-Worker`` header, or by their subject when they
    have none. With a ``Kvblocks-Seq`` header, a gap in the seq (a batch dropped by the server
    or by this subscriber falling behind) and a seq that goes back (the worker started over) are
    losses; for workers whose messages carry no seq, a disconnection from the server or a
    dropped message is a loss of each of them. A worker that sends heartbeats (a
    :class:`~kvblocks.pool.publishers.NatsPublisher` does) and has sent nothing for
    ``gone_after`` seconds is gone: lost once, and read as usual when it is heard again.

    With ``stream``, the subject is read from that JetStream stream (see
    :class:`~kvblocks.pool.publishers.NatsPublisher`; created where missing, so that the
    subscriber may come before the workers) through an ordered consumer:
    first every batch the stream keeps, then the new ones as they come, none missed across a
    reconnection.

    Args:
        sink: gets every worker's batches, in order, and word of lost ones.
        url: the server, ``"nats://127.0.0.1:4222"``.
        subject: the subject to read, wildcards allowed (``"kv-events.>"``).
        connect_timeout: seconds to wait for the server.
        stream: the JetStream stream that keeps the subject's batches; None: core NATS.
        stream_bytes: with ``stream`` created here, the bytes it keeps (the oldest dropped).
        gone_after: seconds without a message from a worker that sends heartbeats after which
            it is gone (at least three of its heartbeats' periods); None: never.

    Raises:
        BackendUnavailableError: nats-py or msgpack is not installed.
        InvalidArgumentError: ``subject`` or ``stream`` is not one, or ``gone_after`` is not
            a positive number of seconds.
        TransferError: no server answered in time, or ``stream`` cannot be read.
    """

    def __init__(
        self,
        sink: EventSink,
        url: str = "nats://127.0.0.1:4222",
        subject: str = "kv-events",
        connect_timeout: float = 5.0,
        stream: str | None = None,
        stream_bytes: int = 2**30,
        gone_after: float | None = GONE_AFTER_S,
    ) -> None:
        require_msgpack()
        self.subject = check_subject(subject, wildcards=True)
        self.stream = None if stream is None else check_stream(stream)
        positive_int(stream_bytes, "stream_bytes")
        self._gone_after = seconds_or_none(gone_after, "gone_after")
        self._sink = sink
        self._workers: dict[str, _NatsWorker] = {}
        self._states_lock = threading.Lock()
        self._closing = False
        self._link = NatsLink(
            url,
            name="kvblocks-nats-sub",
            connect_timeout=connect_timeout,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
        )
        try:
            if stream is not None:
                ensure = ensure_stream(
                    self._link.client, stream, subject, stream_bytes, add_subject=False
                )
                self._link.run(ensure, timeout=connect_timeout + 1)
            self._link.run(self._subscribe(), timeout=connect_timeout + 1)
            if self._gone_after is not None:
                self._link.submit(self._watch_silence(self._gone_after))
        except TransferError:
            self._link.close()
            raise
        except Exception as exc:
            self._link.close()
            where = f"{subject!r}" if stream is None else f"{subject!r} in stream {stream!r}"
            raise TransferError(f"cannot subscribe to {where} at {url}: {exc!r}") from None

    def states(self) -> list[FollowState]:
        """How reading each worker heard so far goes, by name."""
        with self._states_lock:
            return [w.state() for _, w in sorted(self._workers.items())]

    @property
    def connected(self) -> bool:
        """Whether the connection to the server is up now (it comes back by itself)."""
        return self._link.client.is_connected

    def close(self) -> None:
        """Unsubscribe and close the connection (idempotent)."""
        self._closing = True
        self._link.close()

    def __enter__(self) -> NatsSubscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # The connection's thread --------------------------------------------------------------------

    async def _subscribe(self) -> None:
        client = self._link.client
        if self.stream is None:
            await client.subscribe(self.subject, cb=self._on_message)
        else:
            from nats.js.api import DeliverPolicy

            await client.jetstream().subscribe(
                self.subject,
                stream=self.stream,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
                cb=self._on_message,
            )
        await client.flush()  # the server has the subscription

    async def _watch_silence(self, gone_after: float) -> None:
        """Every so often, take workers whose heartbeats stopped for gone (lost once)."""
        while True:
            await asyncio.sleep(min(_SILENCE_CHECK_S, gone_after / 4))
            now = time.monotonic()
            for worker in list(self._workers.values()):
                if worker.silent_too_long(now, gone_after):
                    silent = now - worker.heard
                    log.warning("%s has sent nothing for %.1f s: gone", worker.worker, silent)
                    with self._states_lock:
                        worker.gone = True
                    self._lose(worker)

    async def _on_message(self, msg) -> None:
        headers = msg.headers or {}
        name = headers.get(WORKER_HEADER) or msg.subject
        worker = self._workers.get(name)
        if worker is None:
            worker = _NatsWorker(name, msg.subject)
            with self._states_lock:
                self._workers[name] = worker
        worker.subject = msg.subject
        worker.heard = time.monotonic()
        worker.alive_every = _seconds_of(headers.get(ALIVE_HEADER))
        if worker.gone:
            log.warning("%s is back", name)
            with self._states_lock:
                worker.gone = False
        next_seq = _seq_of(headers.get(NEXT_SEQ_HEADER))
        if next_seq is not None:  # a heartbeat
            if worker.next_seq is not None and next_seq != worker.next_seq:
                warn_out_of_order(log, name, worker.next_seq, next_seq)
                self._lose(worker)
            worker.next_seq = next_seq
            return
        seq = _seq_of(headers.get(SEQ_HEADER))
        if seq is not None and worker.next_seq is not None and seq != worker.next_seq:
            warn_out_of_order(log, name, worker.next_seq, seq)
            self._lose(worker)
        worker.next_seq = None if seq is None else seq + 1
        try:
            batch = decode_batch(msg.data)
        except SerializationError as exc:
            log.warning("dropped a message from %s: %s", name, exc)
            with self._states_lock:
                worker.bad += 1
            self._lose(worker)
            return
        with self._states_lock:
            worker.batches += 1
        tell_sink(log, self._sink.apply, name, batch)

    async def _on_error(self, error: Exception) -> None:
        from nats.errors import SlowConsumerError

        log.warning("NATS: %r", error)
        if isinstance(error, SlowConsumerError):  # the client dropped messages
            self._lose_unnumbered()

    async def _on_disconnected(self) -> None:
        if self._closing or self.stream is not None:  # the stream keeps what is sent meanwhile
            return
        log.warning("disconnected from NATS: events sent meanwhile are lost")
        self._lose_unnumbered()

    def _lose_unnumbered(self) -> None:
        """Messages were dropped: workers without a seq are told (the others find the gap)."""
        for worker in list(self._workers.values()):
            if worker.next_seq is None:
                self._lose(worker)

    def _lose(self, worker: _NatsWorker) -> None:
        with self._states_lock:
            worker.lost += 1
        tell_sink(log, self._sink.lost, worker.worker)


def _seconds_of(header: str | None) -> float | None:
    """The seconds a ``Kvblocks-Alive-Every`` header gives (None when absent or not > 0)."""
    try:
        seconds = float(header) if header is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 < seconds < float("inf") else None


def _seq_of(header: str | None) -> int | None:
    """The seq a ``Kvblocks-Seq`` header gives (None when absent or not a count)."""
    return int(header) if header is not None and header.isdigit() else None
