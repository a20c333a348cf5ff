"""KV events: what a worker's cache gained and lost, for routers that place requests by prefix.

Events travel in :class:`EventBatch` es through an :class:`EventPublisher`. The wire form
(:meth:`EventBatch.to_wire`, msgpack-encoded by the network publishers) has the shape of vLLM's
KV event batches, so routers that read vLLM's events read ours::

    batch        = [ts, [event, ...]]            ts: seconds since the epoch (float)
                   [ts, [event, ...], dp_rank]   when a data-parallel rank is set
    BlockStored  = ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
                    lora_id, medium]
    BlockRemoved = ["BlockRemoved", block_hashes, medium]
    AllBlocksCleared = ["AllBlocksCleared"]

``block_hashes`` are the 64-bit sequence hashes of :mod:`kvblocks.pool.hashing`, in chain order;
``parent_block_hash`` is the hash of the block before the first (None at a sequence's start);
``token_ids`` are the tokens of all the listed blocks; ``medium`` is the tier: ``"GPU"``,
``"CPU"`` or ``"DISK"``.

:meth:`EventBatch.from_wire` also reads what vLLM sends, so a reader of our events reads an
engine's: batches and events as maps (``{"ts": .., "events": [{"type": "BlockStored", ..}]}``)
as well as arrays, fields after ``medium`` (``lora_name``, ``extra_keys``, ...) ignored, block
hashes as bytes as well as ints, and a missing or None ``medium`` read as ``"GPU"``.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from kvblocks.errors import InvalidArgumentError, SerializationError
from kvblocks.pool.tier import Tier

BlockHash = int | bytes
"""A block's hash as an event names it: ours are ints, some engines send bytes."""


@dataclass(frozen=True)
class BlockStored:
    """Blocks of one chain became cached in ``tier``."""

    block_hashes: tuple[BlockHash, ...]
    parent_block_hash: BlockHash | None
    token_ids: tuple[int, ...]
    block_size: int
    tier: Tier
    lora_id: int | None = None

    def to_wire(self) -> list:
        return [
            "BlockStored",
            list(self.block_hashes),
            self.parent_block_hash,
            list(self.token_ids),
            self.block_size,
            self.lora_id,
            self.tier.medium,
        ]


@dataclass(frozen=True)
class BlockRemoved:
    """Blocks stopped being cached in ``tier``."""

    block_hashes: tuple[BlockHash, ...]
    tier: Tier

    def to_wire(self) -> list:
        return ["BlockRemoved", list(self.block_hashes), self.tier.medium]


@dataclass(frozen=True)
class AllBlocksCleared:
    """Every cached block not in use was dropped, in every tier."""

    def to_wire(self) -> list:
        return ["AllBlocksCleared"]


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True)
class EventBatch:
    """Events in the order they happened, stamped with the time of the batch."""

    ts: float
    events: tuple[KvEvent, ...]
    data_parallel_rank: int | None = None

    def to_wire(self) -> list:
        """The batch as plain lists (the vLLM shape in the module docstring)."""
        wire = [self.ts, [e.to_wire() for e in self.events]]
        if self.data_parallel_rank is not None:
            wire.append(self.data_parallel_rank)
        return wire

    @classmethod
    def from_wire(cls, wire: Sequence | Mapping) -> EventBatch:
        """Read a batch back from :meth:`to_wire`'s form, or from vLLM's (see the module
        docstring).

        Raises:
            SerializationError: it is not a batch of known events.
        """
        try:
            if isinstance(wire, Mapping):
                ts, raw, rank = wire["ts"], wire["events"], wire.get("data_parallel_rank")
            else:
                ts, raw, *rest = wire
                rank = rest[0] if rest else None
            events = tuple(_event_from_wire(e) for e in raw)
            return cls(float(ts), events, rank)
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            raise SerializationError(f"not a KV event batch: {exc}") from None


#: The fields of each event, in their array order (vLLM's order; later fields are ignored).
_FIELDS = {
    "BlockStored": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
    ),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}


def _event_from_wire(wire: Sequence | Mapping) -> KvEvent:
    if isinstance(wire, Mapping):
        tag = wire["type"]
        values = {name: wire.get(name) for name in _FIELDS[tag]}
    else:
        tag, *rest = wire
        names = _FIELDS[tag]
        values = dict(zip(names, rest, strict=False))
        if len(values) < len(names) - 1:  # only medium may be left out
            raise ValueError(f"{tag} needs {len(names)} fields, got {len(rest)}")
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    tier = Tier(values.get("medium") or Tier.G1.medium)
    hashes = tuple(values["block_hashes"])
    if tag == "BlockRemoved":
        return BlockRemoved(hashes, tier)
    return BlockStored(
        hashes,
        values["parent_block_hash"],
        tuple(values["token_ids"]),
        int(values["block_size"]),
        tier,
        values["lora_id"],
    )


class EventPublisher(ABC):
    """Sends event batches somewhere. Publishers are used as context managers or closed."""

    @abstractmethod
    def publish(self, batch: EventBatch) -> None:
        """Send one batch (without blocking on slow receivers where the transport allows)."""

    def close(self) -> None:  # noqa: B027 (a publisher with no transport has nothing to close)
        """Send what is pending and let go of the transport."""

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcessPublisher(EventPublisher):
    """Hands each batch to the callbacks subscribed in this process, in the publisher's thread.

    ::

        publisher = InProcessPublisher()
        batches = []
        publisher.subscribe(batches.append)
    """

    def __init__(self) -> None:
        self._subscribers: list[Callable[[EventBatch], None]] = []
        self._lock = threading.Lock()

    def subscribe(self, callback: Callable[[EventBatch], None]) -> Callable[[], None]:
        """Call ``callback(batch)`` for every batch from now on; returns the unsubscribe."""
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.remove(callback)

        return unsubscribe

    def publish(self, batch: EventBatch) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            callback(batch)


class FanOutPublisher(EventPublisher):
    """Hands each batch to several publishers in turn (a worker publishing over ZMQ and NATS at
    once); :meth:`close` closes them all, the first error raised after every one was tried."""

    def __init__(self, publishers: Sequence[EventPublisher]) -> None:
        if not publishers or not all(isinstance(p, EventPublisher) for p in publishers):
            raise InvalidArgumentError(
                "publishers", f"must be one or more EventPublishers, got {publishers!r}"
            )
        self.publishers = tuple(publishers)

    def publish(self, batch: EventBatch) -> None:
        for publisher in self.publishers:
            publisher.publish(batch)

    def close(self) -> None:
        errors = []
        for publisher in self.publishers:
            try:
                publisher.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
