"""Network publishers of KV events: ZMQ (vLLM's wire protocol) and NATS.

Both send each :class:`~kvblocks.pool.events.EventBatch` as msgpack of its wire form. They need
the ``events`` extra (``pip install 'kvblocks[events]'``).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from kvblocks.checks import positive_int, seconds_or_none
from kvblocks.errors import (
    BackendUnavailableError,
    InvalidArgumentError,
    SerializationError,
)
from kvblocks.pool.events import EventBatch, EventPublisher
from kvblocks.pool.nats_link import (
    ALIVE_HEADER,
    NEXT_SEQ_HEADER,
    SEQ_HEADER,
    WORKER_HEADER,
    NatsLink,
    check_stream,
    check_subject,
    default_worker,
    ensure_stream,
)

#: The seq frame that ends a replay.
REPLAY_END = -1
#: Default seconds between a NatsPublisher's heartbeats.
ALIVE_EVERY_S = 5.0


def require_msgpack():
    """The msgpack module (KV event payloads are msgpack).

    Raises:
        BackendUnavailableError: it is not installed.
    """
    try:
        import msgpack
    except ImportError:
        raise BackendUnavailableError(
            "msgpack is not installed: pip install 'kvblocks[events]'"
        ) from None
    return msgpack


def encode_batch(batch: EventBatch) -> bytes:
    """The msgpack bytes of a batch."""
    return require_msgpack().packb(batch.to_wire(), use_bin_type=True)


def decode_batch(payload: bytes) -> EventBatch:
    """A batch from :func:`encode_batch`'s bytes (or from vLLM's).

    Raises:
        SerializationError: the bytes are not msgpack of a KV event batch.
    """
    msgpack = require_msgpack()
    try:
        wire = msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise SerializationError(f"not a KV event batch: {exc!r}") from None
    return EventBatch.from_wire(wire)


class ZmqPublisher(EventPublisher):
    """A ZMQ PUB socket speaking vLLM's KV event protocol.

    Each batch is one multipart message ``[topic, seq, payload]``: ``seq`` counts batches from 0
    as an 8-byte big-endian int, ``payload`` is :func:`encode_batch`. With ``replay_endpoint``,
    a ROUTER socket answers a request holding an 8-byte start seq with ``[seq, payload]`` for
    every kept batch from there on, then ``[-1, b""]``; the last ``buffer_batches`` batches are
    kept.

    Args:
        endpoint: where the PUB socket binds (``"tcp://*:5557"``) or, with ``connect``,
            connects.
        topic: the first frame of every message.
        replay_endpoint: where the replay socket binds; None for no replay.
        buffer_batches: batches kept for replay.
    """

    def __init__(
        self,
        endpoint: str = "tcp://*:5557",
        topic: str = "kv-events",
        replay_endpoint: str | None = None,
        buffer_batches: int = 10_000,
        connect: bool = False,
    ) -> None:
        try:
            import zmq
        except ImportError:
            raise BackendUnavailableError(
                "pyzmq is not installed: pip install 'kvblocks[events]'"
            ) from None
        require_msgpack()
        if isinstance(buffer_batches, bool) or not isinstance(buffer_batches, int):
            raise InvalidArgumentError("buffer_batches", f"must be an int, got {buffer_batches!r}")
        if buffer_batches < 1:
            raise InvalidArgumentError("buffer_batches", f"must be >= 1, got {buffer_batches}")
        self._zmq = zmq
        self._context = zmq.Context.instance()
        self._topic = topic.encode()
        self._lock = threading.Lock()
        self._seq = 0
        self._kept: deque[tuple[int, bytes]] = deque(maxlen=buffer_batches)
        self._pub = self._context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 1000)
        try:
            (self._pub.connect if connect else self._pub.bind)(endpoint)
        except zmq.ZMQError as exc:
            self._pub.close(0)
            raise InvalidArgumentError("endpoint", f"cannot use {endpoint!r}: {exc}") from None
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._replay_thread = None
        self.replay_endpoint = None
        if replay_endpoint is not None:
            router = self._context.socket(zmq.ROUTER)
            try:
                router.bind(replay_endpoint)
            except zmq.ZMQError as exc:
                router.close(0)
                self._pub.close(0)
                raise InvalidArgumentError(
                    "replay_endpoint", f"cannot bind {replay_endpoint!r}: {exc}"
                ) from None
            self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._replay_thread = threading.Thread(
                target=self._serve_replay, args=(router,), name="kvblocks-zmq-replay", daemon=True
            )
            self._replay_thread.start()

    def publish(self, batch: EventBatch) -> None:
        payload = encode_batch(batch)
        with self._lock:
            seq = self._seq
            self._seq += 1
            self._kept.append((seq, payload))
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))

    def _serve_replay(self, router) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                client, *_, start = router.recv_multipart()
                first = int.from_bytes(start, "big")
                with self._lock:
                    kept = [(s, p) for s, p in self._kept if s >= first]
                for seq, payload in kept:
                    router.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
                end = REPLAY_END.to_bytes(8, "big", signed=True)
                router.send_multipart((client, b"", end, b""))
        finally:
            router.close(0)

    def close(self) -> None:
        self._stop.set()
        if self._replay_thread is not None:
            self._replay_thread.join()
        with self._lock:
            if not self._pub.closed:
                self._pub.close()


class NatsPublisher(EventPublisher):
    """Publishes each batch's msgpack bytes on a NATS subject (core NATS, no persistence).

    Each message carries the headers of :mod:`kvblocks.pool.nats_link`: the worker's name and
    the batch's seq (from 0), so that a :class:`~kvblocks.pool.nats_subscriber.NatsSubscriber`
    tells workers on one subject apart and knows when batches were lost. Every ``alive_every``
    seconds it also sends a heartbeat (an empty message with the seq of the next batch), so
    that subscribers tell a worker that died without closing from one with nothing to say. The
    connection runs on its own asyncio loop in a background thread, so :meth:`publish` can be
    called from any thread and does not wait for the server.

    Args:
        url: the server, ``"nats://127.0.0.1:4222"``.
        subject: the subject batches go to (no wildcards).
        worker: the name subscribers know this worker by; a worker that restarts under the same
            name is seen to start over. Default ``"<hostname>-<pid>"``.
        connect_timeout: seconds to wait for the first connection.
        stream: a JetStream stream that keeps the batches (created, or given ``subject``,
            where needed), so that subscribers that come later read them; None: core NATS only.
        stream_bytes: with ``stream`` created here, the bytes it keeps (the oldest dropped).
        alive_every: seconds between heartbeats; None: none (subscribers then never take
            this worker for gone).

    Raises:
        BackendUnavailableError: nats-py or msgpack is not installed.
        InvalidArgumentError: ``subject``, ``worker`` or ``stream`` is not one, or
            ``alive_every`` is not a positive number of seconds.
        TransferError: no server answered in time, or it has no JetStream for ``stream``.
    """

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        subject: str = "kv-events",
        worker: str | None = None,
        connect_timeout: float = 5.0,
        stream: str | None = None,
        stream_bytes: int = 2**30,
        alive_every: float | None = ALIVE_EVERY_S,
    ) -> None:
        require_msgpack()
        self.subject = check_subject(subject, wildcards=False)
        if worker is None:
            worker = default_worker()
        if not isinstance(worker, str) or not worker.isprintable() or not worker.strip():
            raise InvalidArgumentError("worker", f"must be a printable name, got {worker!r}")
        self.worker = worker
        self.alive_every = seconds_or_none(alive_every, "alive_every")
        self._headers = {WORKER_HEADER: worker}
        if self.alive_every is not None:
            self._headers[ALIVE_HEADER] = f"{self.alive_every:g}"
        self._seq = 0
        self._lock = threading.Lock()
        if stream is not None:
            check_stream(stream)
            positive_int(stream_bytes, "stream_bytes")
        self._link = NatsLink(url, name="kvblocks-nats-pub", connect_timeout=connect_timeout)
        if stream is not None:
            try:
                ensure = ensure_stream(self._link.client, stream, subject, stream_bytes)
                self._link.run(ensure, timeout=connect_timeout + 1)
            except BaseException:
                self._link.close()
                raise
        self._heartbeats = None
        if self.alive_every is not None:
            self._heartbeats = self._link.submit(self._beat_forever(self.alive_every))

    def publish(self, batch: EventBatch) -> None:
        payload = encode_batch(batch)
        with self._lock:  # messages start on the loop in the order of their seq
            headers = {**self._headers, SEQ_HEADER: str(self._seq)}
            self._seq += 1
            self._link.submit(self._link.client.publish(self.subject, payload, headers=headers))

    def close(self) -> None:
        if self._heartbeats is not None:
            self._heartbeats.cancel()
        self._link.close()

    async def _beat_forever(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            with self._lock:  # after the batches published so far, before the next
                headers = {**self._headers, NEXT_SEQ_HEADER: str(self._seq)}
                self._link.submit(self._link.client.publish(self.subject, b"", headers=headers))
