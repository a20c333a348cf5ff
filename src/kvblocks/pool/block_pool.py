"""BlockPool: the blocks of one tier, who holds them, and which contents they cache.

Each block is in exactly one :class:`BlockState`::

    FREE --allocate--> EMPTY --fill--> PARTIAL --fill--> COMPLETE --register--> REGISTERED
      ^                  |                |                  |                      |  ^
      |                  +------ free (last holder) ---------+                      |  | acquire
      +------------------------------------------------------------ evict -- INACTIVE <-+
                                                              free (last holder) of REGISTERED

A registered block is known by its sequence hash. When its last holder frees it, it becomes
INACTIVE: still findable by :meth:`match_sequence_hashes` and reusable through
:meth:`acquire`, until :meth:`allocate` runs out of free blocks and evicts the least recently
used inactive blocks. A block someone holds is never evicted.

Per-block state lives in flat arrays indexed by block id, so batches cost a few Python
operations per block.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from enum import IntEnum

from kvblocks.checks import positive_int
from kvblocks.errors import BlockIdOutOfRangeError, InvalidArgumentError, KvBlocksError


class BlockState(IntEnum):
    FREE = 0
    """Unowned and empty; in the free list."""
    EMPTY = 1
    """Owned, no tokens yet."""
    PARTIAL = 2
    """Owned, some tokens."""
    COMPLETE = 3
    """Owned, full, not (yet) known by its hash."""
    REGISTERED = 4
    """Owned, full, findable by its sequence hash."""
    INACTIVE = 5
    """Registered and owned by nobody: reusable on a prefix hit, evicted first-in-LRU."""


class PoolExhaustedError(KvBlocksError):
    """More blocks asked for than are free or evictable (nothing was allocated)."""


class BlockStateError(KvBlocksError):
    """An operation on a block in a state that does not allow it (freeing a free block...)."""


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` tokens.

    Args:
        num_blocks: blocks in the pool.
        block_size: tokens per block.
        on_evict: called with the sequence hashes of the blocks each eviction drops.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        on_evict: Callable[[list[int]], None] | None = None,
    ) -> None:
        self.num_blocks = positive_int(num_blocks, "num_blocks")
        self.block_size = positive_int(block_size, "block_size")
        self.on_evict = on_evict
        self._state = bytearray(num_blocks)  # BlockState per block; all FREE
        self._ref = [0] * num_blocks
        self._tokens = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low ids come out first
        self._inactive: dict[int, None] = {}  # insertion order is LRU order
        self._by_hash: dict[int, int] = {}
        self.evictions = 0

    # Queries ----------------------------------------------------------------------------------

    def state(self, block_id: int) -> BlockState:
        return BlockState(self._state[self._check_id(block_id)])

    def refcount(self, block_id: int) -> int:
        return self._ref[self._check_id(block_id)]

    def tokens(self, block_id: int) -> int:
        return self._tokens[self._check_id(block_id)]

    def hash_of(self, block_id: int) -> int | None:
        """The block's sequence hash while it is registered or inactive."""
        return self._hash[self._check_id(block_id)]

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_inactive(self) -> int:
        return len(self._inactive)

    @property
    def num_available(self) -> int:
        """Blocks an allocation can get: free ones plus evictable inactive ones."""
        return len(self._free) + len(self._inactive)

    @property
    def num_cached(self) -> int:
        """Blocks findable by sequence hash (registered or inactive)."""
        return len(self._by_hash)

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - self.num_available

    def match_sequence_hashes(self, hashes: Iterable[int]) -> list[int]:
        """The blocks of the longest prefix of ``hashes`` that this pool caches (registered or
        inactive), in order. Nothing is acquired: pass the result to :meth:`acquire`."""
        found = []
        by_hash = self._by_hash
        for h in hashes:
            block = by_hash.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def cached_hashes(self) -> list[int]:
        """The sequence hashes of every cached block."""
        return list(self._by_hash)

    def lookup(self, seq_hash: int) -> int | None:
        """The block caching ``seq_hash``, if any."""
        return self._by_hash.get(seq_hash)

    # Changes ----------------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """``n`` EMPTY blocks, each held once; inactive blocks are evicted (least recently used
        first) when too few are free.

        Raises:
            PoolExhaustedError: fewer than ``n`` blocks are free or evictable (nothing changes).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidArgumentError("n", f"must be a non-negative int, got {n!r}")
        short = n - len(self._free)
        if short > 0:
            if short > len(self._inactive):
                raise PoolExhaustedError(
                    f"cannot allocate {n} blocks: {len(self._free)} free and "
                    f"{len(self._inactive)} evictable of {self.num_blocks}"
                )
            self.evict(short)
        if n == 0:
            return []
        ids = self._free[-n:]
        del self._free[-n:]
        state, ref = self._state, self._ref
        for b in ids:
            state[b] = BlockState.EMPTY
            ref[b] = 1
        return ids

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one hold on each block (a block listed twice is dropped twice). A block whose
        last hold goes becomes FREE, or INACTIVE if it is registered.

        Raises:
            BlockStateError: a block is not held that many times (nothing changes).
        """
        ref = self._ref
        self._check_ids(block_ids)
        if len(set(block_ids)) == len(block_ids):
            for b in block_ids:
                if ref[b] < 1:
                    raise BlockStateError(f"block {b} is {self.state(b).name}: not held")
        else:
            for b, times in Counter(block_ids).items():
                if ref[b] < times:
                    raise BlockStateError(f"block {b} is held {ref[b]} times, freed {times}")
        state, free, inactive = self._state, self._free, self._inactive
        for b in block_ids:
            ref[b] -= 1
            if ref[b]:
                continue
            if state[b] == BlockState.REGISTERED:
                state[b] = BlockState.INACTIVE
                inactive[b] = None
            else:
                state[b] = BlockState.FREE
                self._tokens[b] = 0
                free.append(b)

    def acquire(self, block_ids: Sequence[int]) -> None:
        """Add one hold on each registered or inactive block (a prefix hit shares them); an
        inactive block becomes REGISTERED again and leaves the eviction order.

        Raises:
            BlockStateError: a block is neither registered nor inactive (nothing changes).
        """
        self._check_ids(block_ids)
        state = self._state
        for b in block_ids:
            if state[b] not in (BlockState.REGISTERED, BlockState.INACTIVE):
                raise BlockStateError(
                    f"block {b} is {BlockState(state[b]).name}: only cached blocks are shared"
                )
        ref, inactive = self._ref, self._inactive
        for b in block_ids:
            if state[b] == BlockState.INACTIVE:
                del inactive[b]
                state[b] = BlockState.REGISTERED
            ref[b] += 1

    def hold(self, block_ids: Sequence[int]) -> None:
        """Add one hold on each block someone holds already, whatever its state (a copy into
        it that must end before the block is reused, say).

        Raises:
            BlockStateError: a block is not held (nothing changes).
        """
        self._check_ids(block_ids)
        ref = self._ref
        for b in block_ids:
            if ref[b] < 1:
                raise BlockStateError(f"block {b} is {self.state(b).name}: not held")
        for b in block_ids:
            ref[b] += 1

    def fill(self, block_id: int, num_tokens: int) -> BlockState:
        """Record ``num_tokens`` more tokens written into an EMPTY or PARTIAL block you hold
        alone; returns its new state (COMPLETE once it holds ``block_size`` tokens).

        Raises:
            BlockStateError: the block is not EMPTY or PARTIAL, or is shared.
            InvalidArgumentError: the tokens would not fit.
        """
        b = self._check_id(block_id)
        if self._state[b] not in (BlockState.EMPTY, BlockState.PARTIAL) or self._ref[b] != 1:
            raise BlockStateError(
                f"block {b} is {self.state(b).name} with {self._ref[b]} holders: only an empty"
                " or partial block held once can take tokens"
            )
        total = self._tokens[b] + num_tokens
        room = self.block_size - self._tokens[b]
        if num_tokens < 1 or total > self.block_size:
            raise InvalidArgumentError(
                "num_tokens", f"must be in [1, {room}] for block {b}, got {num_tokens}"
            )
        self._tokens[b] = total
        new = BlockState.COMPLETE if total == self.block_size else BlockState.PARTIAL
        self._state[b] = new
        return new

    def register(self, block_id: int, seq_hash: int) -> int:
        """Make a COMPLETE block findable by ``seq_hash``.

        Returns:
            The block that caches ``seq_hash`` from now on: ``block_id``, or the block that
            already cached it (then ``block_id`` stays COMPLETE; free it and use the other).
        """
        b = self._check_id(block_id)
        if self._state[b] != BlockState.COMPLETE:
            raise BlockStateError(
                f"block {b} is {self.state(b).name}: only a complete block can be registered"
            )
        existing = self._by_hash.get(seq_hash)
        if existing is not None:
            return existing
        self._by_hash[seq_hash] = b
        self._hash[b] = seq_hash
        self._state[b] = BlockState.REGISTERED
        return b

    def cache(self, block_ids: Sequence[int], hashes: Sequence[int]) -> list[int]:
        """:meth:`fill` each held block to ``block_size`` tokens (where it is not COMPLETE
        yet) and :meth:`register` it under ``hashes[i]``, in order; every block is checked
        first, so that a bad one changes nothing.

        Returns:
            Per block, the block that caches its hash from now on: itself, or the block that
            already cached the hash (then it stays COMPLETE; free it and use the other).

        Raises:
            InvalidArgumentError: the lengths differ, or an id is out of range.
            BlockStateError: a block appears twice, or is neither COMPLETE nor an EMPTY or
                PARTIAL block held once.
        """
        if len(block_ids) != len(hashes):
            raise InvalidArgumentError(
                "hashes", f"must have one hash per block ({len(block_ids)}), got {len(hashes)}"
            )
        self._check_ids(block_ids)
        state, ref = self._state, self._ref
        fillable = (BlockState.EMPTY, BlockState.PARTIAL)
        for b in block_ids:
            if state[b] != BlockState.COMPLETE and (state[b] not in fillable or ref[b] != 1):
                raise BlockStateError(
                    f"block {b} is {self.state(b).name} with {ref[b]} holders: only a complete"
                    " block, or an empty or partial one held once, can be cached"
                )
        if len(set(block_ids)) != len(block_ids):
            twice = next(b for b, n in Counter(block_ids).items() if n > 1)
            raise BlockStateError(f"block {twice} appears twice")
        by_hash, cached = self._by_hash, []
        for b, h in zip(block_ids, hashes, strict=True):
            self._tokens[b] = self.block_size
            existing = by_hash.get(h)
            if existing is None:
                by_hash[h] = b
                self._hash[b] = h
                state[b] = BlockState.REGISTERED
                cached.append(b)
            else:
                state[b] = BlockState.COMPLETE
                cached.append(existing)
        return cached

    def evict(self, n: int) -> list[int]:
        """Drop up to ``n`` inactive blocks, least recently used first; returns their hashes."""
        inactive = self._inactive
        dropped = [self._drop(next(iter(inactive))) for _ in range(min(n, len(inactive)))]
        self._dropped(dropped)
        return dropped

    def discard(self, block_ids: Sequence[int]) -> list[int]:
        """Make these cached blocks unfindable now, whatever their place in the eviction order
        (their contents turned out bad, say); returns their hashes. An inactive block becomes
        FREE; a held one COMPLETE, and FREE when its last holder frees it.

        Raises:
            BlockStateError: a block is not registered or inactive (nothing changes).
        """
        self._check_ids(block_ids)
        for b in block_ids:
            if self._state[b] not in (BlockState.REGISTERED, BlockState.INACTIVE):
                raise BlockStateError(
                    f"block {b} is {self.state(b).name}: only a cached block can be discarded"
                )
        dropped = []
        for b in dict.fromkeys(block_ids):
            if b in self._inactive:
                dropped.append(self._drop(b))
            else:
                dropped.append(self._hash[b])
                del self._by_hash[self._hash[b]]
                self._hash[b] = None
                self._state[b] = BlockState.COMPLETE
        self._dropped(dropped)
        return dropped

    def _drop(self, b: int) -> int:
        del self._inactive[b]
        h = self._hash[b]
        del self._by_hash[h]
        self._hash[b] = None
        self._tokens[b] = 0
        self._state[b] = BlockState.FREE
        self._free.append(b)
        return h

    def _dropped(self, hashes: list[int]) -> None:
        self.evictions += len(hashes)
        if hashes and self.on_evict is not None:
            self.on_evict(hashes)

    def clear(self) -> list[int]:
        """Evict every inactive block; returns their hashes (blocks in use are untouched)."""
        return self.evict(len(self._inactive))

    # Checks -----------------------------------------------------------------------------------

    def _check_id(self, block_id: int) -> int:
        if not isinstance(block_id, int) or isinstance(block_id, bool):
            raise InvalidArgumentError("block_id", f"must be an int, got {block_id!r}")
        if not 0 <= block_id < self.num_blocks:
            raise BlockIdOutOfRangeError(
                "block_id", f"must be in [0, {self.num_blocks}), got {block_id}"
            )
        return block_id

    def _check_ids(self, block_ids: Sequence[int]) -> None:
        n = self.num_blocks
        for b in block_ids:
            if not isinstance(b, int) or not 0 <= b < n:
                self._check_id(b)

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (for tests)."""
        free, inactive = set(self._free), set(self._inactive)
        assert len(free) == len(self._free), "a block is in the free list twice"
        for b in range(self.num_blocks):
            s, r, h = self._state[b], self._ref[b], self._hash[b]
            assert (s == BlockState.FREE) == (b in free), b
            assert (s == BlockState.INACTIVE) == (b in inactive), b
            assert r >= 0, b
            assert (r == 0) == (s in (BlockState.FREE, BlockState.INACTIVE)), b
            cached = s in (BlockState.REGISTERED, BlockState.INACTIVE)
            assert (h is not None) == cached, b
            if cached:
                assert self._by_hash[h] == b, b
        assert len(self._by_hash) == sum(
            1 for s in self._state if s in (BlockState.REGISTERED, BlockState.INACTIVE)
        )
