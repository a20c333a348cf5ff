"""Which worker caches which prefix, kept from the workers' KV events: what a router asks before
it places a request.

A :class:`KvIndex` applies each worker's :class:`~kvblocks.pool.events.EventBatch` es in order
(:meth:`KvIndex.apply`; :class:`~kvblocks.pool.zmq_subscriber.ZmqSubscriber` delivers them from
the network) and answers, for a prompt, how many of its leading blocks each worker caches and
in which tiers (:meth:`KvIndex.overlaps`)::

    index = KvIndex(block_size=16)
    index.apply("worker-a", batch)
    best = index.overlaps(prompt_tokens)[0]     # Overlap(worker, blocks, by_tier)

Keys. By default a block is known by the hash its events name: workers that run kvblocks hash
blocks the same way (:mod:`~kvblocks.pool.hashing`), so a prompt's hashes are computed here and
looked up. Engines whose hashes differ from process to process (vLLM seeds its hash at random
unless ``PYTHONHASHSEED`` is set) need ``rehash=True``: each stored block is then keyed by the
kvblocks hash of its token ids, chained from its parent's key (the root, salted with the event's
``lora_id`` when set, for a chain's first block), and the engine's hash is kept per worker only
to read its removals. In that mode a stored run whose parent the index does not know is skipped
(counted in :attr:`WorkerView.skipped`), and sequences that differ only in what the engine mixes
into its hashes besides token ids (LoRA names, multimodal inputs, cache salts) share a key.

``AllBlocksCleared`` forgets everything the worker holds. :meth:`KvIndex.lost` does the same
for a worker whose events were lost (a gap no replay filled): an index that forgets sends a
request where its prefix is not, at worst; one that kept stale blocks would send requests to
workers that dropped them.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kvblocks.checks import positive_int
from kvblocks.errors import InvalidArgumentError
from kvblocks.pool.events import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    EventBatch,
)
from kvblocks.pool.hashing import block_hash, root_hash, sequence_hashes
from kvblocks.pool.tier import Tier

#: The tiers a worker's events name, fastest first, each with its bit in a block's tier mask.
_TIERS = (Tier.G1, Tier.G2, Tier.G3)
_BIT = {tier: 1 << i for i, tier in enumerate(_TIERS)}
#: The position in ``_TIERS`` of the fastest tier of each non-empty mask (lowest bit set).
_FASTEST = tuple((mask & -mask).bit_length() - 1 for mask in range(1 << len(_TIERS)))


@dataclass(frozen=True)
class Overlap:
    """How much of a prompt one worker caches.

    Attributes:
        worker: the worker's name, as given to :meth:`KvIndex.apply`.
        blocks: the prompt's leading blocks the worker caches in some tier.
        by_tier: of those blocks, how many the worker holds at best in each tier (a block in
            G1 and G2 counts for G1); tiers with none are left out.
    """

    worker: str
    blocks: int
    by_tier: Mapping[Tier, int]


@dataclass(frozen=True)
class WorkerView:
    """What the index knows of one worker.

    Attributes:
        worker: the worker's name.
        blocks: cached blocks per tier (a block in two tiers counts in both).
        batches: event batches applied.
        skipped: stored blocks that could not be keyed (``rehash`` mode: an unknown parent,
            or token ids that do not fill the blocks; either mode: another block size, or a
            tier other than G1, G2, G3).
        lost: times the worker's events were lost and its blocks forgotten.
    """

    worker: str
    blocks: Mapping[Tier, int]
    batches: int
    skipped: int
    lost: int


@dataclass
class _Worker:
    """One worker's blocks: key -> tier mask, and (rehash mode) its hashes' keys."""

    masks: dict[BlockHash, int] = field(default_factory=dict)
    key_of: dict[BlockHash, int] = field(default_factory=dict)
    counts: dict[Tier, int] = field(default_factory=lambda: dict.fromkeys(_TIERS, 0))
    batches: int = 0
    skipped: int = 0
    lost: int = 0


class KvIndex:
    """The blocks each worker caches, per tier, from their KV events (thread-safe).

    Args:
        block_size: tokens per block; stored events of another block size are skipped.
        rehash: key blocks by the kvblocks hash of their token ids instead of the hash their
            events name (for engines that hash differently; see the module docstring).

    Raises:
        InvalidArgumentError: ``block_size`` is not a positive int.
    """

    def __init__(self, block_size: int, *, rehash: bool = False) -> None:
        self.block_size = positive_int(block_size, "block_size")
        self.rehash = rehash
        self._lock = threading.Lock()
        self._workers: dict[str, _Worker] = {}
        self._holders: dict[BlockHash, set[str]] = {}

    # Updates ------------------------------------------------------------------------------------

    def apply(self, worker: str, batch: EventBatch) -> None:
        """Apply one batch of ``worker`` 's events (batches of one worker in the order sent)."""
        with self._lock:
            entry = self._entry(worker)
            entry.batches += 1
            for event in batch.events:
                if isinstance(event, BlockStored):
                    self._store(worker, entry, event)
                elif isinstance(event, BlockRemoved):
                    self._remove(worker, entry, event)
                elif isinstance(event, AllBlocksCleared):
                    self._clear(worker, entry)

    def lost(self, worker: str) -> None:
        """Events of ``worker`` were lost: forget what it holds until new events say."""
        with self._lock:
            entry = self._entry(worker)
            entry.lost += 1
            self._clear(worker, entry)

    def remove_worker(self, worker: str) -> None:
        """Forget ``worker`` altogether (it left).

        Raises:
            InvalidArgumentError: the index does not know ``worker``.
        """
        with self._lock:
            if worker not in self._workers:
                raise InvalidArgumentError("worker", f"{worker!r} is not in the index")
            self._clear(worker, self._workers.pop(worker))

    # Queries ------------------------------------------------------------------------------------

    def overlaps(self, token_ids: Sequence[int], *, salt: int = 0) -> list[Overlap]:
        """Per known worker, how many of the leading full blocks of ``token_ids`` it caches;
        most blocks first (ties: more of them in faster tiers, then by name).

        Args:
            token_ids: the prompt.
            salt: the salt its blocks were registered with (``rehash`` mode: the LoRA id).
        """
        return self.overlaps_of(sequence_hashes(token_ids, self.block_size, salt=salt))

    def overlaps_of(self, keys: Sequence[BlockHash]) -> list[Overlap]:
        """:meth:`overlaps` for a prompt's block keys computed elsewhere (its sequence
        hashes, or in the default mode the hashes its engine names in events)."""
        with self._lock:
            counts = {w: [0] * len(_TIERS) for w in self._workers}
            masks = {w: e.masks for w, e in self._workers.items()}
            matching: set[str] | None = None
            for key in keys:
                holders = self._holders.get(key)
                if not holders:
                    break
                matching = set(holders) if matching is None else matching & holders
                if not matching:
                    break
                for w in matching:
                    counts[w][_FASTEST[masks[w][key]]] += 1
        overlaps = [
            Overlap(w, sum(c), {t: n for t, n in zip(_TIERS, c, strict=True) if n})
            for w, c in counts.items()
        ]
        overlaps.sort(key=lambda o: (-o.blocks, *(-o.by_tier.get(t, 0) for t in _TIERS), o.worker))
        return overlaps

    def workers(self) -> list[WorkerView]:
        """What the index knows of each worker, by name."""
        with self._lock:
            return [
                WorkerView(w, dict(e.counts), e.batches, e.skipped, e.lost)
                for w, e in sorted(self._workers.items())
            ]

    # Under the lock -----------------------------------------------------------------------------

    def _entry(self, worker: str) -> _Worker:
        if not isinstance(worker, str) or not worker:
            raise InvalidArgumentError("worker", f"must be a non-empty str, got {worker!r}")
        return self._workers.setdefault(worker, _Worker())

    def _store(self, worker: str, entry: _Worker, event: BlockStored) -> None:
        keys = self._keys(entry, event)
        bit = _BIT.get(event.tier)
        if keys is None or bit is None:
            entry.skipped += len(event.block_hashes)
            return
        for h, key in zip(event.block_hashes, keys, strict=True):
            mask = entry.masks.get(key, 0)
            if mask & bit:
                continue
            if not mask:
                self._holders.setdefault(key, set()).add(worker)
            entry.masks[key] = mask | bit
            entry.counts[event.tier] += 1
            if self.rehash:
                entry.key_of[h] = key

    def _keys(self, entry: _Worker, event: BlockStored) -> list | None:
        """The keys of a stored run's blocks; None when they cannot be known."""
        size = self.block_size
        if event.block_size != size:
            return None
        if not self.rehash:
            return list(event.block_hashes)
        tokens = event.token_ids
        if len(tokens) != len(event.block_hashes) * size:
            return None
        if event.parent_block_hash is None:
            parent = root_hash(event.lora_id or 0)
        else:
            parent = entry.key_of.get(event.parent_block_hash)
            if parent is None:
                return None
        keys = []
        for start in range(0, len(tokens), size):
            parent = block_hash(parent, tokens[start : start + size])
            keys.append(parent)
        return keys

    def _remove(self, worker: str, entry: _Worker, event: BlockRemoved) -> None:
        bit = _BIT.get(event.tier)
        for h in event.block_hashes:
            key = entry.key_of.get(h) if self.rehash else h
            mask = entry.masks.get(key, 0)
            if bit is None or not mask & bit:
                continue
            entry.counts[event.tier] -= 1
            mask &= ~bit
            if mask:
                entry.masks[key] = mask
                continue
            del entry.masks[key]
            entry.key_of.pop(h, None)
            holders = self._holders[key]
            holders.discard(worker)
            if not holders:
                del self._holders[key]

    def _clear(self, worker: str, entry: _Worker) -> None:
        for key in entry.masks:
            holders = self._holders[key]
            holders.discard(worker)
            if not holders:
                del self._holders[key]
        entry.masks.clear()
        entry.key_of.clear()
        entry.counts = dict.fromkeys(_TIERS, 0)
