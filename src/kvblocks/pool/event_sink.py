"""What the subscribers of KV events (:class:`~kvblocks.pool.zmq_subscriber.ZmqSubscriber`,
:class:`~kvblocks.pool.nats_subscriber.NatsSubscriber`) deliver to, and what they report.

Each hands a worker's batches to an :class:`EventSink` in the order they were sent, once each.
Batches that no replay brings back (no replay endpoint, the publisher no longer keeps them, or
core NATS, which keeps nothing) are *lost*: :meth:`EventSink.lost` is told, and a
:class:`~kvblocks.pool.kv_index.KvIndex` forgets the worker's blocks until new events say. A
worker that died without closing (a closing BlockManager says ``AllBlocksCleared`` itself) is
found by its silence: after :data:`GONE_AFTER_S` seconds by default it is *gone*, and its
batches count as lost once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from kvblocks.pool.events import EventBatch

#: Default seconds of silence after which a worker is gone (see each subscriber for the kind).
GONE_AFTER_S = 30.0


class EventSink(Protocol):
    """Where a subscriber delivers (a :class:`~kvblocks.pool.kv_index.KvIndex` is one).
    Called from the subscriber's thread, which must not be made to wait on the subscriber
    itself (no ``follow`` or ``close`` from here); what it raises is logged."""

    def apply(self, worker: str, batch: EventBatch) -> None:
        """The next batch of ``worker``."""

    def lost(self, worker: str) -> None:
        """Batches of ``worker`` were lost before the next one applied."""


@dataclass(frozen=True)
class FollowState:
    """How following one worker goes.

    Attributes:
        worker: its name.
        endpoint, replay_endpoint: where its events and its replays come from (over NATS: the
            subject of its last message, and None).
        next_seq: the seq of the next batch it is to deliver (None: nothing heard yet, and no
            replay endpoint to ask; or, over NATS, a worker whose messages carry no seq).
        batches: batches delivered.
        replayed: of those, batches that came through a replay.
        lost: times batches were lost (each told to the sink).
        bad: messages that were not a KV event batch (dropped, and logged).
        gone: its replay endpoint has not answered for the subscriber's ``gone_after``
            seconds and it sent nothing meanwhile; over NATS, it sends heartbeats and none
            came for ``gone_after`` seconds (always False for a worker without a replay
            endpoint or heartbeats: silence there may be a worker with nothing to say).
    """

    worker: str
    endpoint: str
    replay_endpoint: str | None
    next_seq: int | None
    batches: int
    replayed: int
    lost: int
    bad: int
    gone: bool = False


def warn_out_of_order(log: logging.Logger, worker: str, next_seq: int, seq: int) -> None:
    """Log to ``log`` batch ``seq`` of ``worker`` coming where ``next_seq`` was due: batches
    between were lost, or (a seq that goes back) the worker started over."""
    if seq < next_seq:
        log.warning("%s started over: batch %d came after %d", worker, seq, next_seq - 1)
    else:
        log.warning("KV events %d to %d of %s were lost", next_seq, seq - 1, worker)


def tell_sink(log: logging.Logger, method, *args) -> None:
    """Call the sink's ``method(*args)``; what it raises is logged to ``log``, and the
    subscriber's thread goes on."""
    try:
        method(*args)
    except Exception:
        log.exception("the KV event sink failed on %s", args[0])
