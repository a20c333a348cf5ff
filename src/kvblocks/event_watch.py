"""``kvblocks events``: workers' KV events as JSON lines, and what each worker holds.

::

    kvblocks events tcp://10.0.0.5:5557 tcp://10.0.0.6:5557 \\
        --replay tcp://10.0.0.5:5558 --replay tcp://10.0.0.6:5558
    kvblocks events --nats nats://10.0.0.2:4222 --subject kv-events

Follows each worker's ZMQ publisher (kvblocks' or vLLM's) with a
:class:`~kvblocks.pool.zmq_subscriber.ZmqSubscriber`, and every worker publishing on a NATS subject
with a :class:`~kvblocks.pool.nats_subscriber.NatsSubscriber`, and prints one JSON object per event
on stdout, in each worker's order::

    {"worker": W, "ts": T, "type": "BlockStored", "tier": "G2", "medium": "CPU",
     "block_hashes": [...], "parent_block_hash": H, "block_size": 16}
    {"worker": W, "ts": T, "type": "BlockRemoved", "tier": "G1", "medium": "GPU",
     "block_hashes": [...]}
    {"worker": W, "ts": T, "type": "AllBlocksCleared"}
    {"worker": W, "type": "Lost"}        events of W were lost (a gap no replay filled)

``W`` is the worker's endpoint as given (over NATS, the name it publishes under); hashes sent
as bytes are printed in hex. A status line
per worker on stderr every ``status_every`` seconds says what it holds per tier, as a
:class:`~kvblocks.pool.kv_index.KvIndex` fed the same events counts it.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from dataclasses import dataclass
from typing import TextIO

from kvblocks.pool.event_sink import FollowState
from kvblocks.pool.events import AllBlocksCleared, BlockHash, BlockStored, EventBatch
from kvblocks.pool.kv_index import KvIndex
from kvblocks.pool.nats_subscriber import NatsSubscriber
from kvblocks.pool.zmq_subscriber import ZmqSubscriber


@dataclass(frozen=True)
class Followed:
    """A worker to follow: its name, its events' endpoint and its replay endpoint."""

    worker: str
    endpoint: str
    replay_endpoint: str | None = None


@dataclass(frozen=True)
class NatsSource:
    """Where workers publish over NATS: the server, the subject (wildcards allowed) and the
    JetStream stream that keeps their events (None: core NATS, only what comes from now on)."""

    url: str
    subject: str = "kv-events"
    stream: str | None = None


def _hash(value: BlockHash | None) -> int | str | None:
    return value.hex() if isinstance(value, bytes) else value


def event_lines(worker: str, batch: EventBatch, tokens: bool) -> list[dict]:
    """The JSON objects of a batch's events (``tokens``: with their token ids)."""
    lines = []
    for event in batch.events:
        line = {"worker": worker, "ts": batch.ts, "type": type(event).__name__}
        if not isinstance(event, AllBlocksCleared):
            line["tier"] = event.tier.name
            line["medium"] = event.tier.medium
            line["block_hashes"] = [_hash(h) for h in event.block_hashes]
        if isinstance(event, BlockStored):
            line["parent_block_hash"] = _hash(event.parent_block_hash)
            line["block_size"] = event.block_size
            if tokens:
                line["token_ids"] = list(event.token_ids)
        lines.append(line)
    return lines


class _QueueSink:
    """The subscribers' sink: hands batches and losses to the printing thread, and counts
    them into an index once the first stored event gives the block size. The ZMQ and the NATS
    subscriber call it from their own threads."""

    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()
        self.index: KvIndex | None = None
        self._pending: list[tuple[str, EventBatch | None]] = []
        self._lock = threading.Lock()

    def apply(self, worker: str, batch: EventBatch) -> None:
        with self._lock:
            self.items.put((worker, batch))
            self._count(worker, batch)

    def lost(self, worker: str) -> None:
        with self._lock:
            self.items.put((worker, None))
            self._count(worker, None)

    def _count(self, worker: str, batch: EventBatch | None) -> None:
        if self.index is None:
            self._pending.append((worker, batch))
            sizes = [
                e.block_size for e in (batch.events if batch else ()) if isinstance(e, BlockStored)
            ]
            if not sizes:
                return
            self.index = KvIndex(sizes[0])
            pending, self._pending = self._pending, []
        else:
            pending = [(worker, batch)]
        for w, b in pending:
            if b is None:
                self.index.lost(w)
            else:
                self.index.apply(w, b)


def watch_events(
    followed: list[Followed],
    stop: threading.Event,
    *,
    nats: NatsSource | None = None,
    out: TextIO,
    log: TextIO,
    topic: str = "kv-events",
    count: int | None = None,
    seconds: float | None = None,
    tokens: bool = False,
    status_every: float | None = None,
) -> int:
    """Print the events of ``followed`` workers, and of the workers on ``nats``, until
    ``stop`` is set, ``count`` events were printed or ``seconds`` passed; returns the events
    printed.

    Raises:
        InvalidArgumentError: a worker is named twice, or an endpoint or subject is not one.
        TransferError: the NATS server does not answer.
    """
    sink = _QueueSink()
    printed = 0
    start = time.monotonic()
    next_status = start + status_every if status_every else None
    with contextlib.ExitStack() as stack:
        subscribers: list[ZmqSubscriber | NatsSubscriber] = []
        if followed:
            zmq = stack.enter_context(ZmqSubscriber(sink, topic=topic))
            for f in followed:
                zmq.follow(f.worker, f.endpoint, f.replay_endpoint)
            subscribers.append(zmq)
        if nats is not None:
            subscribers.append(
                stack.enter_context(
                    NatsSubscriber(sink, nats.url, subject=nats.subject, stream=nats.stream)
                )
            )
        while not stop.is_set() and (count is None or printed < count):
            now = time.monotonic()
            if seconds is not None and now - start >= seconds:
                break
            if next_status is not None and now >= next_status:
                _print_status(sink.index, subscribers, log)
                next_status = now + status_every
            try:
                worker, batch = sink.items.get(timeout=0.1)
            except queue.Empty:
                continue
            lines = (
                [{"worker": worker, "type": "Lost"}]
                if batch is None
                else event_lines(worker, batch, tokens)
            )
            for line in lines[: None if count is None else count - printed]:
                out.write(json.dumps(line) + "\n")
                printed += 1
            out.flush()
        if status_every:
            _print_status(sink.index, subscribers, log)
    return printed


def _print_status(
    index: KvIndex | None, subscribers: list[ZmqSubscriber | NatsSubscriber], log: TextIO
) -> None:
    views = {v.worker: v for v in index.workers()} if index is not None else {}
    stamp = time.strftime("%H:%M:%S")
    states: list[FollowState] = [s for subscriber in subscribers for s in subscriber.states()]
    for state in states:
        view = views.get(state.worker)
        held = ", ".join(
            f"{tier.name} {n:,}" for tier, n in (view.blocks.items() if view else ()) if n
        )
        log.write(
            f"{stamp} {state.worker}: {held or 'no blocks'}; {state.batches:,} batches"
            f" ({state.replayed:,} replayed), {state.lost} lost{'; gone' if state.gone else ''}\n"
        )
    log.flush()
