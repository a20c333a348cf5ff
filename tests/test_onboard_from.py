"""Which tiers a lookup copies from: some only (``lookup(..., onboard_from=...)``), what
``BlockManager.locate`` says of a prompt, the onboard rates an engine weighs them with
(``skip_slow_reads``, ``read_split``), and G3 blocks staged through a G2 that the prompt's own
blocks fill."""

import importlib.util

import pytest
import torch

from kvblocks.errors import InvalidArgumentError
from kvblocks.pool import (
    BlockManager,
    FrequencyFilter,
    ReadSplit,
    Tier,
    lookup_groups,
    prefetch,
    prometheus_registry,
    read_split,
    sequence_hashes,
    skip_slow_reads,
)
from kvblocks.transfer import block_checksums
from tests.test_manager import BS, check_all_pools, evict_g1, make_config, store, tokens_of


def g2_and_g3(tmp_path, seed: int, g1: int = 8, **overrides):
    """A manager (G1 ``g1``, G2 8, G3 32 blocks) whose G1 has forgotten a prompt of 7 blocks
    that G3 caches, and whose G2 holds the prompt's blocks 0 to 2 and 6 (3 to 5 were evicted
    by another prompt's 4 blocks, which G2 holds too: room to stage G3's blocks). Returns
    (manager, tokens, the checksum of each block by hash)."""
    manager = BlockManager(make_config(tmp_path, g1=g1, g2=8, g3=32, **overrides))
    gen = torch.Generator().manual_seed(seed)
    tokens = tokens_of(seed, 7 * BS)
    expected = store(manager, tokens, gen)
    manager.flush()
    evict_g1(manager)
    hit = manager.lookup(tokens[: 3 * BS])  # blocks 0 to 2: G2's newest now
    manager.free(hit.block_ids)
    evict_g1(manager)
    store(manager, tokens_of(seed + 100, 4 * BS), gen)  # evicts G2's 3 oldest: blocks 3 to 5
    manager.flush()
    evict_g1(manager)
    return manager, tokens, expected


MIXED = [Tier.G2] * 3 + [Tier.G3] * 3 + [Tier.G2]


def held_checksums(manager, hit):
    return block_checksums(manager.layout(Tier.G1), hit.block_ids)


def test_locate_names_the_fastest_tier_of_each_block(tmp_path):
    manager, tokens, _ = g2_and_g3(tmp_path, 1)
    with manager:
        unseen = tokens_of(2, BS + 3)  # one more full block no tier caches, and a partial one
        assert manager.locate(tokens + unseen) == [*MIXED, None]
        assert manager.locate(tokens, salt=5) == [None] * 7
        in_use = {t: manager.pool(t).num_in_use for t in manager.tiers}

        hit = manager.lookup(tokens[:BS])
        assert manager.locate(tokens) == [Tier.G1, *MIXED[1:]]
        manager.free(hit.block_ids)
        assert manager.locate(tokens) == [Tier.G1, *MIXED[1:]]  # cached in G1, not held
        hit = manager.lookup(tokens)
        manager.free(hit.block_ids)
        assert manager.locate(tokens) == [Tier.G1] * 7
        assert {t: manager.pool(t).num_in_use for t in manager.tiers} == in_use
        check_all_pools(manager)


def test_a_lookup_that_leaves_out_g3_stops_at_the_first_block_only_g3_has(tmp_path):
    manager, tokens, expected = g2_and_g3(tmp_path, 3)
    with manager:
        hashes = sequence_hashes(tokens, BS)
        first = manager.lookup(tokens[:BS])
        manager.free(first.block_ids)
        assert manager.locate(tokens) == [Tier.G1, *MIXED[1:]]

        hit = manager.lookup(tokens, onboard_from={Tier.G2, Tier.G4})

        assert (len(hit.block_ids), hit.misses) == (3, 4)
        assert hit.from_tier == {Tier.G1: 1, Tier.G2: 2}
        assert manager.metrics.onboard_blocks[(Tier.G3, Tier.G2)] == 0  # the disk was not read
        assert held_checksums(manager, hit) == [expected[h] for h in hashes[:3]]
        manager.free(hit.block_ids)

        hit = manager.lookup(tokens)  # from every tier: the rest comes from G3 and G2
        assert (len(hit.block_ids), hit.misses) == (7, 0)
        assert hit.from_tier == {Tier.G1: 3, Tier.G3: 3, Tier.G2: 1}
        assert held_checksums(manager, hit) == [expected[h] for h in hashes]
        manager.free(hit.block_ids)
        check_all_pools(manager)


@pytest.mark.parametrize(
    ("onboard_from", "found"),
    [
        ((), 0),  # G1's blocks only: none
        ([Tier.G3], 7),  # G3 has every block (those in G2 too)
        ({Tier.G3, Tier.G4}, 7),
        ((Tier.G2,), 3),  # block 3 is in G3 only
        ({Tier.G2, Tier.G4}, 3),
        (frozenset({Tier.G2, Tier.G3}), 7),
        (None, 7),
    ],
)
def test_the_prefix_ends_where_no_tier_named_caches_a_block(tmp_path, onboard_from, found):
    manager, tokens, expected = g2_and_g3(tmp_path, 4)
    with manager:
        misses = manager.metrics.misses
        hit = manager.lookup(tokens, onboard_from=onboard_from)
        assert (len(hit.block_ids), hit.misses) == (found, 7 - found)
        if onboard_from is not None and Tier.G2 not in onboard_from:
            assert manager.metrics.onboard_blocks[(Tier.G3, Tier.G2)] == found
        assert manager.metrics.misses - misses == 7 - found
        assert held_checksums(manager, hit) == [expected[h] for h in hit.hashes]
        manager.free(hit.block_ids)
        check_all_pools(manager)


@pytest.mark.parametrize(
    "onboard_from",
    [Tier.G3, "G3", {Tier.G1}, {Tier.G2, "DISK"}, [Tier.G2, 3], 5, {Tier.G1, Tier.G2}],
)
def test_onboard_from_names_tiers_below_g1(tmp_path, onboard_from):
    manager, tokens, _ = g2_and_g3(tmp_path, 5)
    with manager:
        metrics = manager.metrics
        cached = {t: manager.pool(t).num_cached for t in manager.tiers}
        before = (metrics.misses, sum(metrics.hits.values()), dict(metrics.onboard_blocks))
        with pytest.raises(InvalidArgumentError, match="onboard_from"):
            manager.lookup(tokens, onboard_from=onboard_from)
        assert {t: manager.pool(t).num_cached for t in manager.tiers} == cached
        assert all(manager.pool(t).num_in_use == 0 for t in manager.tiers)
        assert (metrics.misses, sum(metrics.hits.values()), dict(metrics.onboard_blocks)) == before


def test_a_window_lookup_counts_blocks_of_a_left_out_tier_as_missing(tmp_path):
    manager, tokens, expected = g2_and_g3(tmp_path, 6, sliding_window=2 * BS)
    with manager:
        hashes = sequence_hashes(tokens, BS)
        prompt = tokens[: 5 * BS]
        # a window hit holds the last 2 blocks only: block 0 was not used, and left G2
        assert manager.locate(prompt) == [Tier.G3, Tier.G2, Tier.G2, Tier.G3, Tier.G3]

        hit = manager.lookup(prompt, onboard_from={Tier.G2})

        assert (hit.skipped, len(hit.block_ids), hit.misses) == (1, 2, 2)
        assert hit.from_tier == {Tier.G1: 0, Tier.G2: 2}
        assert held_checksums(manager, hit) == [expected[h] for h in hashes[1:3]]
        assert manager.metrics.onboard_blocks[(Tier.G3, Tier.G2)] == 0
        manager.free(hit.block_ids)

        hit = manager.lookup(prompt)  # every tier: blocks 3 and 4 from G3
        assert (hit.skipped, len(hit.block_ids), hit.misses) == (3, 2, 0)
        assert hit.from_tier == {Tier.G1: 0, Tier.G3: 2}
        assert held_checksums(manager, hit) == [expected[h] for h in hashes[3:5]]
        manager.free(hit.block_ids)
        check_all_pools(manager)


def test_onboard_rates_are_bytes_over_the_seconds_of_the_copies(tmp_path):
    manager, tokens, _ = g2_and_g3(tmp_path, 7)
    with manager:
        metrics = manager.metrics
        assert metrics.onboard_rate(Tier.G3, Tier.G2) is None  # G3 not read yet

        hit = manager.lookup(tokens)
        manager.free(hit.block_ids)
        manager.flush()

        for pair, blocks in (((Tier.G3, Tier.G2), 3), ((Tier.G2, Tier.G1), 3 + 7)):
            assert metrics.onboard_blocks[pair] == blocks
            assert metrics.onboard_bytes[pair] == blocks * manager.block_bytes
            assert metrics.onboard_seconds[pair] > 0
            expected = metrics.onboard_bytes[pair] / metrics.onboard_seconds[pair]
            assert metrics.onboard_rate(*pair) == pytest.approx(expected)
        assert metrics.onboard_rate(Tier.G4, Tier.G2) is None
        assert (Tier.G1, Tier.G2) not in metrics.onboard_seconds  # offloads are not counted
        if importlib.util.find_spec("prometheus_client"):
            from prometheus_client import generate_latest

            text = generate_latest(prometheus_registry(metrics)).decode()
            assert 'kvbm_onboard_seconds_total{dst="CPU",src="DISK"}' in text


def test_lookup_groups_copies_from_the_tiers_named_in_every_group(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "window").mkdir()
    full, tokens, expected_full = g2_and_g3(tmp_path / "full", 8)
    window, _, expected_window = g2_and_g3(tmp_path / "window", 8, sliding_window=2 * BS)
    hashes = sequence_hashes(tokens, BS)
    with full, window:
        assert full.locate(tokens) == MIXED
        assert window.locate(tokens)[:3] == [Tier.G3, Tier.G2, Tier.G2]

        hits = lookup_groups([full, window], tokens, onboard_from={Tier.G2}, wait=False)

        assert [h.num_tokens for h in hits] == [3 * BS, 3 * BS]  # full: block 3 is G3's only
        assert hits[1].skipped == 1
        for manager, hit, expected in zip(
            (full, window), hits, (expected_full, expected_window), strict=True
        ):
            hit.ready.synchronize()
            assert held_checksums(manager, hit) == [expected[h] for h in hit.hashes]
            assert manager.metrics.onboard_blocks[(Tier.G3, Tier.G2)] == 0
            manager.free(hit.block_ids)

        hits = lookup_groups([full, window], tokens)  # every tier: the whole prompt
        assert [h.num_tokens for h in hits] == [7 * BS, 7 * BS]
        assert held_checksums(full, hits[0]) == [expected_full[h] for h in hashes]
        for manager, hit in zip((full, window), hits, strict=True):
            manager.free(hit.block_ids)
            check_all_pools(manager)


def test_skip_slow_reads_leaves_g3_out_where_reading_is_slower_than_computing(tmp_path):
    manager, tokens, _ = g2_and_g3(tmp_path, 9)
    with manager:
        assert manager.locate(tokens) == MIXED  # blocks 3 to 5 in G3 only, 3 to 6 computed
        assert skip_slow_reads(manager, tokens, 1.0) is None  # no disk rate yet: read it
        block = manager.block_bytes
        # A disk that reads one block a second: 3 blocks read in 3 s, or 4 blocks' 16 tokens
        # computed in 3.2 s (5 tokens a second) or 2.7 s (6 a second).
        assert skip_slow_reads(manager, tokens, 5.0, disk_bytes_per_s=block) is None
        assert skip_slow_reads(manager, tokens, 6.0, disk_bytes_per_s=block) == {Tier.G2, Tier.G4}
        manager.metrics.record_transfer(Tier.G3, Tier.G2, 1, block, 1.0, True)  # measured
        assert skip_slow_reads(manager, tokens, 5.0) is None
        assert skip_slow_reads(manager, tokens, 6.0) == {Tier.G2, Tier.G4}
        assert skip_slow_reads(manager, tokens, 6.0, disk_bytes_per_s=1e12) is not None
        assert skip_slow_reads(manager, tokens[: 3 * BS], 1e12) is None  # no block in G3 only
        assert skip_slow_reads(manager, tokens, 6.0, salt=1) is None  # nothing cached

        hit = manager.lookup(tokens, onboard_from=skip_slow_reads(manager, tokens, 6.0))
        assert (len(hit.block_ids), hit.misses) == (3, 4)
        manager.free(hit.block_ids)


def test_read_split_computes_the_first_g3_blocks_while_the_rest_is_read(tmp_path, monkeypatch):
    """Blocks 3 to 5 in G3 only, 6 in G2: the split point that makes the longer of computing
    from block 3 and reading the G3 blocks after it the shortest."""
    manager, tokens, _ = g2_and_g3(tmp_path, 11)
    with manager:
        assert manager.locate(tokens) == MIXED
        assert read_split(manager, tokens, 1.0) == ReadSplit(3, 3, 7, 0.0, None)  # rate unknown
        block = manager.block_bytes

        def split(tokens_per_s, **kw):
            return read_split(manager, tokens, tokens_per_s, disk_bytes_per_s=block, **kw)

        # A block read in 1 s and computed in 1 s: compute 3, read 4 and 5 (1 s against 2 s).
        assert split(float(BS)) == ReadSplit(3, 4, 7, 1.0, 2.0)
        # In chunks of 2 blocks: compute 3 and 4, read 5 (2 s against 1 s).
        assert split(float(BS), chunk_blocks=2) == ReadSplit(3, 5, 7, 2.0, 1.0)
        with pytest.raises(InvalidArgumentError, match="chunk_blocks"):
            split(float(BS), chunk_blocks=0)
        # Computing 4x as fast: compute 3 to 5 (0.75 s), read nothing but G2's block 6.
        assert split(4.0 * BS) == ReadSplit(3, 6, 7, 0.75, 0.0)
        # Computing 3x as slow: read all three G3 blocks (3 s against 3 s for one computed).
        assert split(BS / 3) == ReadSplit(3, 3, 7, 0.0, 3.0)
        # Prefetches holding a quarter of G2 (2 blocks) at most: the read starts at block 5.
        monkeypatch.setattr(prefetch, "PREFETCH_SHARE", 4)
        assert split(BS / 3) == ReadSplit(3, 5, 7, 6.0, 1.0)
        monkeypatch.undo()
        manager.metrics.record_transfer(Tier.G3, Tier.G2, 1, 2 * block, 1.0, True)  # measured
        assert split(BS / 3) == ReadSplit(3, 3, 7, 0.0, 1.5)  # the measured rate counts
        assert split(float(BS)) == ReadSplit(3, 4, 7, 1.0, 1.0)
        assert read_split(manager, tokens[: 3 * BS], 1.0) == ReadSplit(3, 3, 3, 0.0, 0.0)
        assert split(1.0, salt=1) == ReadSplit(0, 0, 0, 0.0, 0.0)  # nothing cached


@pytest.mark.parametrize("choose", [skip_slow_reads, read_split])
@pytest.mark.parametrize("rate", [0, -1.0, "5", True, float("nan"), None])
def test_skip_slow_reads_and_read_split_need_positive_rates(tmp_path, rate, choose):
    manager, tokens, _ = g2_and_g3(tmp_path, 10)
    with manager:
        with pytest.raises(InvalidArgumentError, match="prefill_tokens_per_s"):
            choose(manager, tokens, rate)
        if rate is not None:
            with pytest.raises(InvalidArgumentError, match="disk_bytes_per_s"):
                choose(manager, tokens, 1.0, disk_bytes_per_s=rate)
            with pytest.raises(InvalidArgumentError, match="peer_bytes_per_s"):
                choose(manager, tokens, 1.0, peer_bytes_per_s=rate)


@pytest.mark.parametrize("g2", [4, 5])
def test_a_prompt_longer_than_g2_comes_back_whole_from_g2_and_g3(tmp_path, g2):
    """G2 holds only a long prompt's last blocks (every one of its blocks): the blocks G3 has
    before them are staged through G2 all the same, some of G2's read from G3 instead to make
    room, and the whole prompt is served."""
    manager = BlockManager(make_config(tmp_path, g1=16, g2=g2, g3=32))
    with manager:
        tokens = tokens_of(11, 7 * BS)
        expected = store(manager, tokens, torch.Generator().manual_seed(11))
        manager.flush()
        evict_g1(manager)
        assert manager.locate(tokens) == [Tier.G3] * (7 - g2) + [Tier.G2] * g2

        hit = manager.lookup(tokens)

        assert (len(hit.block_ids), hit.misses) == (7, 0)
        assert hit.from_tier[Tier.G3] >= 7 - g2 and hit.from_tier[Tier.G2] >= 1
        assert held_checksums(manager, hit) == [expected[h] for h in hit.hashes]
        manager.free(hit.block_ids)
        manager.flush()
        assert all(manager.pool(t).num_in_use == 0 for t in manager.tiers)
        check_all_pools(manager)


def test_without_room_to_stage_a_g2_block_g3_lacks_ends_the_prefix(tmp_path):
    """As above, but G3 lacks the prompt's last blocks (the disk filter kept them off): the
    last G2 block is let go to make room, and the prefix ends before it."""
    config = make_config(tmp_path, g1=16, g2=4, g3=32)
    with BlockManager(config, disk_filter=FrequencyFilter(min_uses=2)) as manager:
        gen = torch.Generator().manual_seed(12)
        tokens = tokens_of(12, 7 * BS)
        expected = store(manager, tokens[: 3 * BS], gen)  # blocks 0 to 2: G2
        manager.free(manager.lookup(tokens[: 3 * BS]).block_ids)  # a second use: on to G3
        manager.flush()
        expected.update(store(manager, tokens, gen))  # 3 to 6: G2 (evicting 0 to 2), not G3
        manager.flush()
        evict_g1(manager)
        assert manager.locate(tokens) == [Tier.G3] * 3 + [Tier.G2] * 4
        assert manager.pool(Tier.G3).num_cached == 3

        hit = manager.lookup(tokens)

        assert (len(hit.block_ids), hit.misses) == (6, 1)
        assert hit.from_tier == {Tier.G1: 0, Tier.G3: 3, Tier.G2: 3}
        assert held_checksums(manager, hit) == [expected[h] for h in hit.hashes]
        manager.free(hit.block_ids)
        manager.flush()
        assert all(manager.pool(t).num_in_use == 0 for t in manager.tiers)
        check_all_pools(manager)
