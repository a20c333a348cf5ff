"""BlockPool and sequence hashes: lifecycle, sharing, prefix reuse, eviction, invariants."""

import itertools
import random
import subprocess
import sys
from collections import Counter

import blake3
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvblocks.errors import BlockIdOutOfRangeError, InvalidArgumentError
from kvblocks.pool import (
    HASH_KEY,
    ROOT_HASH,
    BlockPool,
    BlockState,
    BlockStateError,
    PoolExhaustedError,
    block_hash,
    root_hash,
    sequence_hashes,
)


def test_sequence_hashes_chain_and_prefixes():
    tokens = list(range(100))
    hashes = sequence_hashes(tokens, 16)
    assert len(hashes) == 6  # the 4 trailing tokens do not make a block
    assert hashes[0] == block_hash(ROOT_HASH, tokens[:16])
    assert hashes[1] == block_hash(hashes[0], tokens[16:32])
    assert sequence_hashes(tokens[:48] + [7] * 52, 16)[:3] == hashes[:3]  # same prefix
    assert sequence_hashes(tokens[:40], 16) == hashes[:2]
    other = tokens.copy()
    other[0] = 999
    assert all(a != b for a, b in zip(sequence_hashes(other, 16), hashes, strict=True))
    assert sequence_hashes(tokens[32:], 16, parent=hashes[1]) == hashes[2:]
    assert sequence_hashes(tokens, 16, salt=5)[0] != hashes[0]
    assert root_hash(5) != ROOT_HASH and all(0 <= h < 2**64 for h in hashes)
    rng = random.Random(0)
    for size in (1, 3, 16):  # every block chained from the one before, random tokens
        tokens = [rng.randrange(2**32) for _ in range(11 * size - 1)]
        chained = [root_hash(9)]
        for i in range(10):
            chained.append(block_hash(chained[-1], tokens[i * size : (i + 1) * size]))
        assert sequence_hashes(tokens, size, salt=9) == chained[1:]


def test_hashes_are_the_same_in_another_process():
    code = "from kvblocks.pool import sequence_hashes; print(sequence_hashes(list(range(64)), 16))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(sequence_hashes(list(range(64)), 16))


def test_hash_follows_the_documented_encoding():
    """The scheme is a contract between workers: recompute it from its description."""
    parent = (0x6B76626C6F636B73).to_bytes(8, "little")
    tokens = b"".join(t.to_bytes(4, "little") for t in [1, 2, 3, 70000])
    digest = blake3.blake3(parent + tokens, key=HASH_KEY).digest(8)
    assert sequence_hashes([1, 2, 3, 70000], 4) == [int.from_bytes(digest, "little")]
    assert HASH_KEY == b"kvblocks sequence hash, v1......"


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "7"])
def test_hash_rejects_bad_tokens_naming_the_first(bad):
    tokens = [1, 2, 3, 4, 5, 6, bad, 8, bad]
    with pytest.raises(InvalidArgumentError, match=r"token_ids must hold ints in .* at index 6"):
        sequence_hashes(tokens, 4)
    assert sequence_hashes(tokens[:4] + [bad], 4) == sequence_hashes(tokens[:4], 4)  # not hashed


def test_lifecycle():
    pool = BlockPool(4, block_size=4)
    (b,) = pool.allocate(1)
    assert pool.state(b) is BlockState.EMPTY and pool.refcount(b) == 1
    assert pool.fill(b, 3) is BlockState.PARTIAL
    assert pool.fill(b, 1) is BlockState.COMPLETE and pool.tokens(b) == 4
    assert pool.register(b, 111) == b and pool.state(b) is BlockState.REGISTERED
    assert pool.hash_of(b) == 111 and pool.lookup(111) == b
    pool.free([b])
    assert pool.state(b) is BlockState.INACTIVE and pool.num_inactive == 1
    assert pool.match_sequence_hashes([111, 222]) == [b]
    pool.acquire([b])
    assert pool.state(b) is BlockState.REGISTERED and pool.refcount(b) == 1
    pool.free([b])
    assert pool.clear() == [111]
    assert pool.state(b) is BlockState.FREE and pool.tokens(b) == 0 and pool.lookup(111) is None
    pool.check_invariants()


def test_sharing_and_eviction_order():
    evicted = []
    pool = BlockPool(3, block_size=2, on_evict=evicted.extend)
    blocks = pool.allocate(3)
    for i, b in enumerate(blocks):
        pool.fill(b, 2)
        pool.register(b, 100 + i)
    pool.acquire([blocks[1]])  # shared by a second request
    pool.free(blocks)
    assert pool.state(blocks[1]) is BlockState.REGISTERED  # still held once
    pool.acquire([blocks[0]])
    pool.free([blocks[0]])  # block 0 was used most recently now
    (new,) = pool.allocate(1)  # evicts the least recently used inactive block: 2
    assert new == blocks[2] and evicted == [102] and pool.evictions == 1
    with pytest.raises(PoolExhaustedError, match="cannot allocate 2 blocks"):
        pool.allocate(2)  # block 1 is held: only block 0 can be evicted
    assert pool.state(blocks[0]) is BlockState.INACTIVE  # a failed allocation changes nothing
    pool.check_invariants()


def test_an_extra_hold_keeps_a_block_of_any_state_until_it_is_freed():
    pool = BlockPool(3, block_size=2)
    empty, cached = pool.allocate(2)
    pool.fill(cached, 2)
    pool.register(cached, 5)
    pool.hold([empty, cached])
    pool.free([empty, cached])  # the first holder lets go
    assert pool.state(empty) is BlockState.EMPTY and pool.refcount(empty) == 1
    assert pool.state(cached) is BlockState.REGISTERED and pool.num_available == 1
    pool.free([empty, cached])
    assert pool.state(empty) is BlockState.FREE and pool.state(cached) is BlockState.INACTIVE
    with pytest.raises(BlockStateError, match="is FREE: not held"):
        pool.hold([empty])
    pool.check_invariants()


def test_discarding_a_held_block_makes_it_unfindable_and_free_once_let_go():
    dropped = []
    pool = BlockPool(3, block_size=2, on_evict=dropped.extend)
    held, idle = pool.allocate(2)
    for b, h in ((held, 10), (idle, 11)):
        pool.fill(b, 2)
        pool.register(b, h)
    pool.free([idle])
    assert pool.discard([held, idle]) == [10, 11] and dropped == [10, 11]
    assert pool.lookup(10) is None and pool.lookup(11) is None
    assert pool.state(held) is BlockState.COMPLETE and pool.state(idle) is BlockState.FREE
    pool.free([held])
    assert pool.state(held) is BlockState.FREE
    with pytest.raises(BlockStateError, match="only a cached block can be discarded"):
        pool.discard([held])
    pool.check_invariants()


def test_duplicate_registration_returns_the_cached_block():
    pool = BlockPool(2, block_size=1)
    a, b = pool.allocate(2)
    pool.fill(a, 1)
    pool.fill(b, 1)
    assert pool.register(a, 7) == a
    assert pool.register(b, 7) == a
    assert pool.state(b) is BlockState.COMPLETE


def _pool_facts(pool: BlockPool) -> list[tuple]:
    """Each block's state, holders, tokens and hash."""
    return [
        (pool.state(b), pool.refcount(b), pool.tokens(b), pool.hash_of(b))
        for b in range(pool.num_blocks)
    ]


@pytest.mark.parametrize("seed", range(6))
def test_cache_is_fill_then_register_for_each_block(seed):
    """Held blocks of random fill (some complete already), some hashes repeated or cached by
    another block already: ``cache`` leaves the pool as ``fill`` and ``register`` block by
    block would."""
    rng = random.Random(seed)
    pools = BlockPool(24, block_size=4), BlockPool(24, block_size=4)
    for pool in pools:
        old = pool.allocate(2)
        for b in old:
            pool.fill(b, 4)
        pool.register(old[0], 500)
        pool.register(old[1], 501)
    blocks = rng.sample(range(2, 24), 12)
    filled = {b: rng.randint(0, 4) for b in blocks}
    hashes = [rng.choice([500, 501, 502, 503, *range(600, 640)]) for _ in blocks]
    for pool in pools:
        got = pool.allocate(22)
        assert sorted(got) == list(range(2, 24))
        for b in blocks:
            if filled[b]:
                pool.fill(b, filled[b])
    one_by_one = []
    for b, h in zip(blocks, hashes, strict=True):
        if filled[b] < 4:
            pools[0].fill(b, 4 - filled[b])
        one_by_one.append(pools[0].register(b, h))
    assert pools[1].cache(blocks, hashes) == one_by_one
    assert _pool_facts(pools[1]) == _pool_facts(pools[0])
    pools[1].check_invariants()


def test_cache_checks_every_block_before_it_changes_one():
    pool = BlockPool(6, block_size=2)
    a, b, c, d = pool.allocate(4)
    for x in (a, b):
        pool.fill(x, 2)
    pool.register(a, 9)
    pool.fill(c, 1)
    pool.acquire([a])
    before = _pool_facts(pool)
    cases = [
        ([b, c], [1], InvalidArgumentError, r"hashes must have one hash per block \(2\), got 1"),
        ([b, 7], [1, 2], BlockIdOutOfRangeError, r"block_id must be in \[0, 6\), got 7"),
        ([b, a], [1, 2], BlockStateError, f"block {a} is REGISTERED with 2 holders"),
        ([c, d, c], [1, 2, 3], BlockStateError, f"block {c} appears twice"),
        ([b, 5], [1, 2], BlockStateError, "block 5 is FREE with 0 holders"),
    ]
    for ids, hashes, error, match in cases:
        with pytest.raises(error, match=match):
            pool.cache(ids, hashes)
        assert _pool_facts(pool) == before
    pool.hold([c])  # a partial block held twice: another holder may still write it
    with pytest.raises(BlockStateError, match=f"block {c} is PARTIAL with 2 holders"):
        pool.cache([b, c], [1, 2])
    assert pool.state(b) is BlockState.COMPLETE
    pool.check_invariants()


def test_errors_change_nothing():
    pool = BlockPool(4, block_size=2)
    a, b = pool.allocate(2)
    cases = [
        (lambda: pool.free([a, a]), BlockStateError, f"block {a} is held 1 times, freed 2"),
        (lambda: pool.free([2]), BlockStateError, "block 2 is FREE: not held"),
        (lambda: pool.free([9]), BlockIdOutOfRangeError, r"block_id must be in \[0, 4\)"),
        (lambda: pool.acquire([a]), BlockStateError, "only cached blocks are shared"),
        (lambda: pool.register(a, 1), BlockStateError, "only a complete block"),
        (lambda: pool.fill(a, 3), InvalidArgumentError, r"num_tokens must be in \[1, 2\]"),
        (lambda: pool.allocate(-1), InvalidArgumentError, "n must be a non-negative int"),
        (lambda: pool.allocate(3), PoolExhaustedError, "2 free and 0 evictable"),
        (lambda: BlockPool(0, 4), InvalidArgumentError, "num_blocks must be a positive int"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    assert [pool.refcount(x) for x in range(4)] == [1, 1, 0, 0]
    pool.check_invariants()


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / fill / register / share / free / lookup / evict sequences."""

    def __init__(self):
        super().__init__()
        self.pool = BlockPool(12, block_size=3)
        self.holds: Counter = Counter()  # block -> holds the model expects
        self.hashes = itertools.count(1000)

    @rule(n=st.integers(0, 5))
    def allocate(self, n):
        available = self.pool.num_available
        if n > available:
            with pytest.raises(PoolExhaustedError):
                self.pool.allocate(n)
            return
        for b in self.pool.allocate(n):
            assert self.holds[b] == 0, f"block {b} handed out while held"
            self.holds[b] += 1

    @precondition(lambda self: +self.holds)
    @rule(data=st.data())
    def fill(self, data):
        fillable = [
            b
            for b in self.holds
            if self.pool.state(b) in (BlockState.EMPTY, BlockState.PARTIAL) and self.holds[b] == 1
        ]
        if fillable:
            b = data.draw(st.sampled_from(fillable))
            room = 3 - self.pool.tokens(b)
            self.pool.fill(b, data.draw(st.integers(1, room)))

    @rule(data=st.data(), duplicate=st.booleans())
    def register(self, data, duplicate):
        complete = [b for b in +self.holds if self.pool.state(b) is BlockState.COMPLETE]
        if not complete:
            return
        b = data.draw(st.sampled_from(complete))
        cached = [self.pool.hash_of(x) for x in range(12) if self.pool.hash_of(x) is not None]
        h = data.draw(st.sampled_from(cached)) if duplicate and cached else next(self.hashes)
        owner = self.pool.register(b, h)
        assert self.pool.lookup(h) == owner

    @rule(data=st.data())
    def share_prefix(self, data):
        cached = [self.pool.hash_of(x) for x in range(12) if self.pool.hash_of(x) is not None]
        if not cached:
            return
        wanted = data.draw(st.lists(st.sampled_from(cached), min_size=1, max_size=4))
        hits = self.pool.match_sequence_hashes(wanted)
        assert hits == [self.pool.lookup(h) for h in wanted[: len(hits)]]
        self.pool.acquire(hits)
        for b in hits:
            self.holds[b] += 1

    @precondition(lambda self: +self.holds)
    @rule(data=st.data())
    def free(self, data):
        held = list((+self.holds).elements())
        drop = data.draw(st.lists(st.sampled_from(held), min_size=1, max_size=4, unique=True))
        self.pool.free(drop)
        for b in drop:
            self.holds[b] -= 1

    @rule(n=st.integers(0, 4))
    def evict(self, n):
        self.pool.evict(n)

    @invariant()
    def consistent(self):
        self.pool.check_invariants()
        for b in range(12):
            assert self.pool.refcount(b) == self.holds[b], b
        assert self.pool.num_in_use == len(+self.holds)


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_pool_state_machine = PoolMachine.TestCase
