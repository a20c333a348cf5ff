"""Sliding-window layers: which prefix a lookup hits, and that only the window is held and
copied (``BlockManagerConfig.sliding_window``, :mod:`kvblocks.pool.window`)."""

import random

import pytest
import torch

from kvblocks.errors import InvalidArgumentError
from kvblocks.pool import BlockManager, Tier, lookup_groups, sequence_hashes
from kvblocks.pool.window import blocks_needed, window_hit
from kvblocks.transfer import block_checksums
from tests.test_manager import (
    BS,
    check_all_pools,
    evict_g1,
    flip_g3_byte,
    make_config,
    store,
    tokens_of,
    write_random,
)


def longest_hit(cached: list[bool], needed: int) -> int:
    """The definition: the longest prefix whose last ``needed`` blocks (all of it, if
    shorter) are cached."""
    return max(n for n in range(len(cached) + 1) if all(cached[max(n - needed, 0) : n]))


@pytest.mark.parametrize(("window", "size", "needed"), [(2, 4, 1), (5, 4, 1), (6, 4, 2), (9, 4, 2)])
def test_blocks_needed_hold_the_last_window_minus_one_tokens(window, size, needed):
    assert blocks_needed(window, size) == needed


def test_window_hit_is_the_longest_prefix_whose_window_is_cached():
    rng = random.Random(0)
    for _ in range(2000):
        n, needed = rng.randrange(0, 14), rng.randrange(1, 6)
        cached = [rng.random() < 0.7 for _ in range(n)]
        asked = []

        def ask(i, cached=cached, asked=asked):
            asked.append(i)
            return cached[i]

        end = window_hit(n, needed, ask)
        assert end == longest_hit(cached, needed), (cached, needed)
        assert asked == list(range(n - 1, -1, -1))[: len(asked)]  # from the last block back
        if end >= needed:  # nothing before the window was asked
            assert min(asked) == end - needed


def register_runs(manager, tokens, positions, gen):
    """Register G1 blocks for the given block positions of ``tokens`` (each run chained to the
    hash before it, as if the blocks before the run had been computed and dropped); returns
    the G1 block of each position."""
    hashes = sequence_hashes(tokens, BS)
    placed, run = {}, []
    for p in [*sorted(positions), None]:
        if run and (p is None or p != run[-1] + 1):
            blocks = manager.allocate(len(run))
            write_random(manager, blocks, gen)
            parent = hashes[run[0] - 1] if run[0] else None
            manager.register(blocks, tokens[run[0] * BS : (run[-1] + 1) * BS], parent_hash=parent)
            manager.free(blocks)
            placed.update(zip(run, blocks, strict=True))
            run = []
        if p is not None:
            run.append(p)
    return placed


@pytest.mark.parametrize("window", [2, BS + 1, 2 * BS + 1, 3 * BS])
def test_a_lookup_holds_only_the_window_before_the_hit_end(tmp_path, window):
    rng = random.Random(window)
    gen = torch.Generator().manual_seed(window)
    needed = blocks_needed(window, BS)
    for trial in range(12):
        config = make_config(tmp_path, g1=16, g2=0, g3=0, sliding_window=window)
        with BlockManager(config) as manager:
            tokens = tokens_of(trial, 12 * BS + 2)
            positions = {p for p in range(12) if rng.random() < 0.6}
            placed = register_runs(manager, tokens, positions, gen)
            hashes = sequence_hashes(tokens, BS)

            hit = manager.lookup(tokens)

            end = longest_hit([p in positions for p in range(12)], needed)
            start = max(end - needed, 0)
            assert (hit.skipped, hit.misses, hit.num_tokens) == (start, 12 - end, end * BS)
            assert hit.block_ids == [placed[p] for p in range(start, end)]
            assert hit.hashes == hashes[start:end]
            assert hit.last_hash == (hashes[end - 1] if end else None)
            assert hit.from_tier == {Tier.G1: end - start}
            g1 = manager.pool(Tier.G1)
            assert all(g1.refcount(b) == (1 if b in hit.block_ids else 0) for b in placed.values())
            manager.free(hit.block_ids)
            check_all_pools(manager)


def test_only_the_window_is_copied_back_from_g2_and_g3(tmp_path):
    gen = torch.Generator().manual_seed(1)
    config = make_config(tmp_path, g1=8, g2=4, g3=32, sliding_window=2 * BS)
    with BlockManager(config) as manager:
        tokens = tokens_of(1, 7 * BS)
        expected = store(manager, tokens, gen)
        manager.flush()
        evict_g1(manager)  # the last 4 blocks are in G2, every block in G3
        hashes = sequence_hashes(tokens, BS)

        hit = manager.lookup(tokens)

        assert (hit.skipped, len(hit.block_ids), hit.misses) == (5, 2, 0)
        assert hit.from_tier == {Tier.G1: 0, Tier.G2: 2}
        assert manager.metrics.onboard_blocks[(Tier.G2, Tier.G1)] == 2
        assert manager.metrics.window_skipped == 5
        assert block_checksums(manager.layout(Tier.G1), hit.block_ids) == [
            expected[h] for h in hashes[5:]
        ]
        manager.free(hit.block_ids)

        hit = manager.lookup(tokens[: 3 * BS])  # blocks 1 and 2: out of G2, read from G3
        assert (hit.skipped, hit.from_tier) == (1, {Tier.G1: 0, Tier.G3: 2})
        assert block_checksums(manager.layout(Tier.G1), hit.block_ids) == [
            expected[h] for h in hashes[1:3]
        ]
        manager.free(hit.block_ids)
        check_all_pools(manager)


def test_a_corrupted_block_in_the_window_moves_the_hit_back(tmp_path):
    gen = torch.Generator().manual_seed(2)
    config = make_config(tmp_path, g1=8, g2=4, g3=32, sliding_window=2 * BS)
    with BlockManager(config) as manager:
        tokens = tokens_of(2, 6 * BS)
        expected = store(manager, tokens, gen)
        for i in range(2):  # push the blocks out of G2 and G1: G3 alone has them
            store(manager, tokens_of(50 + i, 4 * BS), gen)
        manager.flush()
        evict_g1(manager)
        hashes = sequence_hashes(tokens, BS)
        assert not any(manager.pool(Tier.G2).lookup(h) for h in hashes)
        flip_g3_byte(manager, hashes[5], 7)

        hit = manager.lookup(tokens)

        assert (hit.skipped, len(hit.block_ids), hit.misses) == (3, 2, 1)
        assert hit.hashes == hashes[3:5]
        assert block_checksums(manager.layout(Tier.G1), hit.block_ids) == [
            expected[h] for h in hashes[3:5]
        ]
        assert manager.metrics.corrupt_blocks == 1
        assert manager.pool(Tier.G3).lookup(hashes[5]) is None
        manager.free(hit.block_ids)
        check_all_pools(manager)


def test_a_window_of_blocks_from_g2_and_from_g1_in_turn_is_held_whole(tmp_path):
    gen = torch.Generator().manual_seed(4)
    config = make_config(tmp_path, g1=8, g2=3, g3=0, sliding_window=3 * BS)
    with BlockManager(config) as manager:
        tokens = tokens_of(4, 4 * BS)
        expected = store(manager, tokens, gen)
        manager.flush()
        hashes = sequence_hashes(tokens, BS)
        g1, g2 = manager.pool(Tier.G1), manager.pool(Tier.G2)
        g1.evict(2)  # blocks 0 and 1 leave G1, and block 2 leaves G2: each is in one tier
        g2.discard([g2.lookup(hashes[2])])
        assert [g1.lookup(h) is not None for h in hashes] == [False, False, True, True]
        assert [g2.lookup(h) is not None for h in hashes] == [False, True, False, True]

        hit = manager.lookup(tokens)

        assert (hit.skipped, len(hit.block_ids), hit.misses) == (1, 3, 0)
        assert hit.from_tier == {Tier.G1: 2, Tier.G2: 1}
        assert block_checksums(manager.layout(Tier.G1), hit.block_ids) == [
            expected[h] for h in hashes[1:]
        ]
        manager.free(hit.block_ids)
        check_all_pools(manager)


def test_max_blocks_caps_the_hit_of_either_kind_of_layer(tmp_path):
    gen = torch.Generator().manual_seed(3)
    tokens = tokens_of(3, 6 * BS)
    for window, (skipped, held) in ((None, (0, 3)), (2 * BS, (1, 2)), (BS, (2, 1))):
        config = make_config(tmp_path, g1=8, g2=0, g3=0, sliding_window=window)
        with BlockManager(config) as manager:
            store(manager, tokens, gen)
            hit = manager.lookup(tokens, max_blocks=3)
            assert (hit.skipped, len(hit.block_ids), hit.num_tokens) == (skipped, held, 3 * BS)
            assert hit.last_hash == sequence_hashes(tokens, BS)[2]
            manager.free(hit.block_ids)
            assert manager.lookup(tokens, max_blocks=0).num_tokens == 0
            for bad in (-1, 1.5, True):
                with pytest.raises(InvalidArgumentError, match="max_blocks"):
                    manager.lookup(tokens, max_blocks=bad)


@pytest.mark.parametrize("bad", [1, 0, 2.5, "8", True])
def test_sliding_window_must_be_a_count_of_at_least_two_tokens(tmp_path, bad):
    with pytest.raises(InvalidArgumentError, match="sliding_window"):
        make_config(tmp_path, sliding_window=bad)


def test_lookup_groups_finds_the_longest_prefix_every_group_holds(tmp_path):
    """A full-attention group and two window groups, each caching its own random blocks: the
    hits agree on the longest length all three can hit, and nothing else stays held."""
    rng = random.Random(5)
    gen = torch.Generator().manual_seed(5)
    windows = (None, 2 * BS, 3 * BS + 1)
    for trial in range(15):
        tokens = tokens_of(100 + trial, 12 * BS)
        managers, placed, cached = [], [], []
        for i, window in enumerate(windows):
            folder = tmp_path / f"{trial}-{i}"
            folder.mkdir()
            manager = BlockManager(make_config(folder, g1=16, g2=0, g3=0, sliding_window=window))
            positions = {p for p in range(12) if rng.random() < (0.9 if window is None else 0.6)}
            placed.append(register_runs(manager, tokens, positions, gen))
            cached.append([p in positions for p in range(12)])
            managers.append(manager)

        hits = lookup_groups(managers, tokens)

        def holds(n, cached=cached):
            return all(
                all(c[max(n - blocks_needed(w, BS), 0) : n] if w else c[:n])
                for w, c in zip(windows, cached, strict=True)
            )

        agreed = max(n for n in range(13) if holds(n))
        for manager, hit, where, window in zip(managers, hits, placed, windows, strict=True):
            assert hit.num_tokens == agreed * BS
            start = max(agreed - blocks_needed(window, BS), 0) if window else 0
            assert hit.skipped == start
            assert hit.block_ids == [where[p] for p in range(start, agreed)]
            g1 = manager.pool(Tier.G1)
            assert g1.num_in_use == len(hit.block_ids)
            manager.free(hit.block_ids)
            check_all_pools(manager)
            manager.close()


def test_lookup_groups_checks_its_managers(tmp_path):
    with pytest.raises(InvalidArgumentError, match="managers"):
        lookup_groups([], [1, 2, 3])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        BlockManager(make_config(tmp_path / "a", g2=0, g3=0)) as a,
        BlockManager(make_config(tmp_path / "b", g2=0, g3=0, block_size=8)) as b,
    ):
        with pytest.raises(InvalidArgumentError, match=r"managers must share one block size"):
            lookup_groups([a, b], list(range(32)))
