"""TierSet: the tiers' pools and handles, copies between them, the chains of cached hashes and
the events their changes make (CPU; system memory stands in for every tier)."""

import random

import pytest
import torch

from kvblocks.layout import LayoutConfig
from kvblocks.pool import BlockRemoved, BlockStored, Tier
from kvblocks.pool.metrics import PoolMetrics
from kvblocks.pool.tier_set import ChainInfo, TierSet
from kvblocks.storage import PhysicalLayout
from kvblocks.transfer import TransferManager
from tests.helpers import assert_bits_equal, poisoned, random_tensor

BS = 4
CFG = LayoutConfig(
    num_blocks=6,
    num_layers=2,
    outer_dim=2,
    page_size=BS,
    inner_dim=16,  # heads x head dim, per token
    dtype_width_bytes=2,
    num_heads=2,
)


SHAPE = (CFG.num_blocks, CFG.num_layers, CFG.outer_dim, BS * CFG.inner_dim)


@pytest.fixture
def memory() -> dict[Tier, torch.Tensor]:
    """The bf16 tensors G1 and G2 live in, ``[num_blocks, nl, no, inner]``."""
    return {tier: torch.empty(SHAPE, dtype=torch.bfloat16) for tier in (Tier.G1, Tier.G2)}


@pytest.fixture
def tiers(memory):
    with TransferManager.builder().build() as transfer:
        block_bytes = memory[Tier.G1][0].numel() * 2
        tiers = TierSet(transfer, PoolMetrics(dict), BS, block_bytes)
        for tier, tensor in memory.items():
            builder = PhysicalLayout.builder(CFG).fully_contiguous()
            tiers.add(tier, builder.with_external_regions([tensor]).build())
        yield tiers
        tiers.release()


def chain(tiers: TierSet, n: int, parent: int | None, seed: int) -> tuple[list[int], list[int]]:
    """``n`` made-up hashes chained from ``parent``, remembered with random tokens."""
    rng = random.Random(seed)
    hashes = [rng.getrandbits(63) for _ in range(n)]
    tokens = [rng.randrange(50_000) for _ in range(n * BS)]
    with tiers.lock:
        tiers.remember_chains(hashes, tokens, parent)
    return hashes, tokens


def test_it_maps_tiers_to_their_states_fastest_first(tiers):
    assert list(tiers) == [Tier.G1, Tier.G2] and len(tiers) == 2
    assert Tier.G3 not in tiers and tiers.get(Tier.G3) is None
    assert tiers[Tier.G2].tier is Tier.G2 and tiers[Tier.G2].pool.num_blocks == CFG.num_blocks


def test_remember_chains_keeps_each_blocks_parent_and_tokens(tiers):
    hashes, tokens = chain(tiers, 3, parent=17, seed=1)
    assert [tiers.chains[h] for h in hashes] == [
        ChainInfo(p, tuple(tokens[i * BS : (i + 1) * BS]))
        for i, p in enumerate([17, hashes[0], hashes[1]])
    ]


def test_emit_stored_makes_one_event_per_run_that_chains(tiers):
    first, tokens = chain(tiers, 3, parent=None, seed=2)
    other, other_tokens = chain(tiers, 2, parent=first[0], seed=3)  # a branch after block 0
    with tiers.lock:
        tiers.emit_stored(Tier.G2, first + other)
    events = tiers.take_events()
    assert events == [
        BlockStored(tuple(first), None, tuple(tokens), BS, Tier.G2),
        BlockStored(tuple(other), first[0], tuple(other_tokens), BS, Tier.G2),
    ]
    assert tiers.take_events() == []


def test_eviction_emits_removed_and_forgets_chains_no_tier_caches(tiers):
    hashes, _ = chain(tiers, CFG.num_blocks, parent=None, seed=4)
    with tiers.lock:
        for tier, cached_there in ((Tier.G1, hashes), (Tier.G2, hashes[:2])):
            pool = tiers[tier].pool
            blocks = pool.allocate(len(cached_there))
            cached, new = tiers.cache(pool, blocks, cached_there)
            assert cached == blocks and new == list(zip(blocks, cached_there, strict=True))
            pool.free(blocks)
        tiers.take_events()
        tiers[Tier.G1].pool.allocate(3)  # evicts the 3 least recently used G1 blocks
    removed = tiers.take_events()
    assert len(removed) == 1 and isinstance(removed[0], BlockRemoved)
    assert removed[0].tier is Tier.G1 and len(removed[0].block_hashes) == 3
    gone = set(removed[0].block_hashes)
    for h in hashes:  # G2 still caches the first two, so their chains stay
        assert (h in tiers.chains) == (h not in gone or h in hashes[:2])
    assert tiers.metrics.evictions[Tier.G1] == 3


def test_cache_reports_blocks_whose_hash_another_block_caches(tiers):
    hashes, _ = chain(tiers, 2, parent=None, seed=5)
    g1 = tiers[Tier.G1].pool
    with tiers.lock:
        a = g1.allocate(2)
        tiers.cache(g1, a, hashes)
        b = g1.allocate(2)
        cached, new = tiers.cache(g1, b, [hashes[0], 12345])
    assert cached == [a[0], b[1]] and new == [(b[1], 12345)]


def test_copy_moves_the_blocks_and_counts_them(tiers, memory):
    src, dst = memory[Tier.G1], memory[Tier.G2]
    src.copy_(random_tensor(SHAPE, torch.bfloat16, generator=torch.Generator().manual_seed(6)))
    dst.copy_(poisoned(SHAPE, torch.bfloat16))
    before = dst.clone()
    tiers.copy(Tier.G1, [4, 1], Tier.G2, [0, 5], onboard=False)
    for s, d in ((4, 0), (1, 5)):
        assert_bits_equal(dst[d], src[s])
    assert_bits_equal(dst[1:5], before[1:5])
    block_bytes = src[0].numel() * src.element_size()
    assert tiers.metrics.offload_blocks[(Tier.G1, Tier.G2)] == 2
    assert tiers.metrics.offload_bytes[(Tier.G1, Tier.G2)] == 2 * block_bytes
    tiers.copy(Tier.G2, [], Tier.G1, [], onboard=True)
    assert not tiers.metrics.onboard_blocks


def test_cache_holding_moves_the_hold_of_a_duplicate_onto_the_block_that_caches_it(tiers):
    hashes, _ = chain(tiers, 3, None, seed=7)
    pool = tiers[Tier.G2].pool
    with tiers.lock:
        first = pool.allocate(2)
        tiers.cache(pool, first, hashes[:2])  # hashes 0 and 1 cached by the first blocks
        pool.free(first)  # inactive now
        second = pool.allocate(3)
        held, new = tiers.cache_holding(pool, second, hashes)

        assert held == [*first, second[2]]
        assert new == [(second[2], hashes[2])]
        assert [pool.refcount(b) for b in held] == [1, 1, 1]
        assert [pool.refcount(b) for b in second[:2]] == [0, 0]  # the duplicates went free
        assert [pool.lookup(h) for h in hashes] == held
        pool.free(held)
        pool.check_invariants()
