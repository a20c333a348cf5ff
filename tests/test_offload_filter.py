"""Which blocks reach the disk: FrequencyFilter, and a BlockManager with a disk filter."""

import pytest
import torch

from kvblocks.errors import InvalidArgumentError
from kvblocks.pool import BlockManager, FrequencyFilter, Tier, prometheus_registry
from kvblocks.transfer import block_checksums
from tests.test_manager import BS, check_all_pools, evict_g1, make_config, store, tokens_of


def test_frequency_filter_passes_a_hash_from_its_nth_use():
    f = FrequencyFilter(min_uses=3)
    assert f.use([1, 2, 1]) == []
    assert not f.passes(1) and f.uses(1) == 2
    assert f.use([1, 2]) == [1]  # third use of 1
    assert f.passes(1) and not f.passes(2)
    assert f.use([1, 2, 2]) == [2]  # 1 passed already: not returned again
    assert f.passes(2) and f.uses(1) == 4 and f.uses(7) == 0


def test_frequency_filter_forgets_the_least_recently_used_hashes():
    f = FrequencyFilter(min_uses=2, max_tracked=3)
    f.use([1, 2, 3])
    f.use([1])  # 1 is now the most recent: 2 goes first
    f.use([4])
    assert f.uses(2) == 0 and f.uses(1) == 2 and f.uses(3) == 1
    assert f.use([2]) == []  # counting starts again


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"min_uses": 0}, "min_uses"),
        ({"min_uses": True}, "min_uses"),
        ({"max_tracked": 2.5}, "max_tracked"),
    ],
)
def test_frequency_filter_rejects_bad_arguments(kwargs, named):
    with pytest.raises(InvalidArgumentError, match=named):
        FrequencyFilter(**kwargs)


def test_manager_rejects_a_disk_filter_without_the_methods(tmp_path):
    with pytest.raises(InvalidArgumentError, match="disk_filter"):
        BlockManager(make_config(tmp_path), disk_filter=lambda h: True)


def test_blocks_reach_the_disk_on_their_second_use(tmp_path):
    """Blocks used once stay off G3; a lookup that uses them again writes them there, and they
    come back from G3 with their bytes (here in the next process, through the journal)."""
    config = make_config(tmp_path, g1=8, g2=16, g3=64)
    gen = torch.Generator().manual_seed(5)
    sequences = [tokens_of(s, 4 * BS) for s in range(3)]
    with BlockManager(config, disk_filter=FrequencyFilter(2)) as manager:
        expected = {}
        for tokens in sequences:
            expected.update(store(manager, tokens, gen))
        manager.flush()
        assert manager.pool(Tier.G2).num_cached == 12
        assert manager.pool(Tier.G3).num_cached == 0
        assert manager.metrics.disk_filtered_blocks == 12
        evict_g1(manager)
        hit = manager.lookup(sequences[1])  # the second use, found in G2
        assert hit.from_tier == {Tier.G1: 0, Tier.G2: 4}
        manager.free(hit.block_ids)
        manager.flush()
        on_disk = {h for h in expected if manager.pool(Tier.G3).lookup(h) is not None}
        assert on_disk == set(hit.hashes)
        check_all_pools(manager)
    with BlockManager(config, disk_filter=FrequencyFilter(2)) as manager:
        again = manager.lookup(sequences[1])
        assert again.from_tier.get(Tier.G3) == 4
        got = block_checksums(manager.layout(Tier.G1), again.block_ids)
        assert got == [expected[h] for h in again.hashes]
        manager.free(again.block_ids)
        assert manager.lookup(sequences[0]).block_ids == []  # it never reached the disk
        check_all_pools(manager)


def test_registering_the_same_blocks_again_is_a_use(tmp_path):
    """An engine that computes a prefix again (no lookup) registers its hashes a second time:
    that is their second use, and they go to disk."""
    config = make_config(tmp_path, g1=8, g2=16, g3=64)
    gen = torch.Generator().manual_seed(6)
    with BlockManager(config, disk_filter=FrequencyFilter(2)) as manager:
        tokens = tokens_of(9, 3 * BS)
        store(manager, tokens, gen)
        manager.flush()
        assert manager.pool(Tier.G3).num_cached == 0
        blocks = manager.allocate(3)
        hashes = manager.register(blocks, tokens)
        manager.free(blocks)
        manager.flush()
        assert all(manager.pool(Tier.G3).lookup(h) is not None for h in hashes)
        check_all_pools(manager)


class EvenHashes:
    """A custom filter: only even hashes go to disk."""

    def __init__(self):
        self.seen = []

    def use(self, hashes):
        self.seen.extend(hashes)
        return []

    def passes(self, sequence_hash):
        return sequence_hash % 2 == 0


def test_a_custom_filter_decides_alone(tmp_path):
    config = make_config(tmp_path, g1=8, g2=16, g3=64)
    gen = torch.Generator().manual_seed(7)
    custom = EvenHashes()
    with BlockManager(config, disk_filter=custom) as manager:
        sums = store(manager, tokens_of(11, 6 * BS), gen)
        manager.flush()
        on_disk = {h for h in sums if manager.pool(Tier.G3).lookup(h) is not None}
        assert on_disk == {h for h in sums if h % 2 == 0}
        assert custom.seen == list(sums)  # the registration's uses, in order
        assert manager.metrics.disk_filtered_blocks == len(sums) - len(on_disk)


def test_without_a_filter_every_block_reaches_the_disk(tmp_path):
    config = make_config(tmp_path, g1=8, g2=16, g3=64)
    gen = torch.Generator().manual_seed(8)
    with BlockManager(config) as manager:
        sums = store(manager, tokens_of(12, 5 * BS), gen)
        manager.flush()
        assert all(manager.pool(Tier.G3).lookup(h) is not None for h in sums)
        assert manager.metrics.disk_filtered_blocks == 0


def test_the_filtered_count_is_exported(tmp_path):
    pytest.importorskip("prometheus_client")
    from prometheus_client import generate_latest

    config = make_config(tmp_path, g1=8, g2=16, g3=64)
    with BlockManager(config, disk_filter=FrequencyFilter(2)) as manager:
        store(manager, tokens_of(13, 3 * BS), torch.Generator().manual_seed(9))
        manager.flush()
        text = generate_latest(prometheus_registry(manager.metrics)).decode()
    assert "kvbm_disk_filtered_blocks_total 3.0" in text
