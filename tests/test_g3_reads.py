"""Reads from G3 on a lookup: in chunks, each chunk checked against the journal while the next
ones are read, and the last round of staging blocks copied into G1 with G2's own blocks."""

import math

import pytest
import torch

from kvblocks.errors import StorageError, TransferError
from kvblocks.pool import BlockManager, Tier, onboarder, sequence_hashes
from kvblocks.storage import disk
from kvblocks.transfer import block_checksums
from tests.test_manager import (
    BS,
    check_all_pools,
    evict_g1,
    flip_g3_byte,
    make_config,
    store,
    tokens_of,
)

BLOCKS = 7


@pytest.fixture
def chunk_of(monkeypatch):
    """Set the chunk of G3 reads to ``n`` blocks of ``config``."""

    def set_chunk(config, n):
        monkeypatch.setattr(onboarder, "READ_CHUNK_BYTES", n * config.block_bytes)

    return set_chunk


@pytest.fixture
def disk_reads(monkeypatch):
    """The number of reads from G3 files so far (one per chunk)."""
    calls = []
    read = disk.DiskAllocation.read

    def counted(self, spans, pool=None):
        calls.append(1)
        return read(self, spans, pool)

    monkeypatch.setattr(disk.DiskAllocation, "read", counted)
    return calls


def stored_on_disk(tmp_path, seed, g2=16):
    """The config of managers (G1 16 blocks, G2 ``g2``, G3 32) and, stored in G3 by a manager
    that has closed (so a new one starts with G1 and G2 empty), a prompt of 7 blocks.
    Returns (config, tokens, the checksum of each block by hash)."""
    config = make_config(tmp_path, g1=16, g2=g2, g3=32)
    tokens = tokens_of(seed, BLOCKS * BS)
    with BlockManager(config) as manager:
        expected = store(manager, tokens, torch.Generator().manual_seed(seed))
        manager.flush()
    return config, tokens, expected


def g1_checksums(manager, block_ids):
    return block_checksums(manager.layout(Tier.G1), block_ids)


def nothing_held(manager):
    manager.flush()
    assert all(manager.pool(t).num_in_use == 0 for t in manager.tiers)
    check_all_pools(manager)


@pytest.mark.parametrize("wait", [True, False])
@pytest.mark.parametrize(("chunk", "g2"), [(1, 16), (2, 16), (3, 16), (64, 16), (2, 3)])
def test_g3_blocks_are_read_in_chunks_and_all_served(
    tmp_path, chunk_of, disk_reads, chunk, g2, wait
):
    config, tokens, expected = stored_on_disk(tmp_path, 21, g2=g2)
    chunk_of(config, chunk)
    with BlockManager(config) as manager:
        assert manager.locate(tokens) == [Tier.G3] * BLOCKS
        disk_reads.clear()

        hit = manager.lookup(tokens, wait=wait)
        rounds = [min(g2, BLOCKS - i) for i in range(0, BLOCKS, g2)]  # G2's room each round
        # the last round's staging blocks are held until their copies into G1 are seen to end
        assert manager.pool(Tier.G2).num_in_use == (0 if wait else rounds[-1])
        hit.ready.synchronize()

        assert (len(hit.block_ids), hit.misses) == (BLOCKS, 0)
        assert hit.from_tier == {Tier.G1: 0, Tier.G3: BLOCKS}
        assert g1_checksums(manager, hit.block_ids) == [expected[h] for h in hit.hashes]
        assert len(disk_reads) == sum(math.ceil(r / chunk) for r in rounds)
        assert manager.metrics.onboard_blocks[(Tier.G3, Tier.G2)] == BLOCKS
        manager.flush()  # copies of a lookup that did not wait are counted once seen to end
        assert manager.metrics.onboard_blocks[(Tier.G2, Tier.G1)] == BLOCKS
        manager.free(hit.block_ids)
        nothing_held(manager)
        evict_g1(manager)  # the blocks read stay cached in G2 (as many as it holds)
        assert manager.locate(tokens)[-min(g2, BLOCKS) :] == [Tier.G2] * min(g2, BLOCKS)


def test_a_bad_block_in_a_later_chunk_ends_the_prefix_there(tmp_path, chunk_of, disk_reads):
    config, tokens, expected = stored_on_disk(tmp_path, 22)
    chunk_of(config, 2)
    with BlockManager(config) as manager:
        assert manager.locate(tokens) == [Tier.G3] * BLOCKS
        bad = sequence_hashes(tokens, BS)[4]  # the first block of the third chunk
        flip_g3_byte(manager, bad, 7)
        disk_reads.clear()

        hit = manager.lookup(tokens)

        assert (len(hit.block_ids), hit.misses) == (4, 3)
        assert g1_checksums(manager, hit.block_ids) == [expected[h] for h in hit.hashes]
        assert manager.metrics.corrupt_blocks == 1
        assert manager.locate(tokens)[4:] == [None, Tier.G3, Tier.G3]  # only the bad one left
        assert len(disk_reads) == 4  # chunks 1 to 3, and the one read ahead of the bad
        manager.free(hit.block_ids)
        nothing_held(manager)


def test_a_failed_read_lets_every_block_go(tmp_path, chunk_of, monkeypatch):
    config, tokens, expected = stored_on_disk(tmp_path, 23)
    chunk_of(config, 2)
    with BlockManager(config) as manager:
        reads = []
        read = disk.DiskAllocation.read

        def second_fails(self, spans, pool=None):
            reads.append(1)
            if len(reads) == 2:
                raise StorageError("injected read error", self.path)
            return read(self, spans, pool)

        monkeypatch.setattr(disk.DiskAllocation, "read", second_fails)
        with pytest.raises(TransferError, match="injected read error"):
            manager.lookup(tokens)
        nothing_held(manager)
        assert manager.metrics.corrupt_blocks == 0

        monkeypatch.setattr(disk.DiskAllocation, "read", read)
        hit = manager.lookup(tokens)
        assert (len(hit.block_ids), hit.misses) == (BLOCKS, 0)
        assert g1_checksums(manager, hit.block_ids) == [expected[h] for h in hit.hashes]
        manager.free(hit.block_ids)
        nothing_held(manager)
