"""Prefetches: a prompt's G3 (and peers') blocks read into G2 on the manager's background
thread while the caller goes on, held there until released, so that the lookup after it
copies the whole prefix from G2 and reads no disk."""

import asyncio
import importlib.util
import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch

from kvblocks.errors import InvalidArgumentError, StorageError, TransferError
from kvblocks.pool import (
    WITHOUT_DISK,
    BlockManager,
    Tier,
    lookup_groups,
    prefetch,
    prometheus_registry,
    sequence_hashes,
)
from kvblocks.pool.window import blocks_needed
from kvblocks.remote import nixl_available
from kvblocks.storage import disk
from tests.test_g3_reads import BLOCKS, g1_checksums, nothing_held, stored_on_disk
from tests.test_manager import (
    BS,
    evict_g1,
    flip_g3_byte,
    make_config,
    store,
    tokens_of,
    write_random,
)

ONLY_G2 = {Tier.G2}


class GatedReads:
    """Reads of G3 files that wait for :meth:`open` (each counted as it starts)."""

    def __init__(self, monkeypatch) -> None:
        self.started = []
        self._gate = threading.Event()
        read = disk.DiskAllocation.read

        def gated(allocation, spans, pool=None):
            self.started.append(1)
            assert self._gate.wait(10), "a test left the gate of G3 reads shut"
            return read(allocation, spans, pool)

        monkeypatch.setattr(disk.DiskAllocation, "read", gated)

    def open(self) -> None:
        self._gate.set()


def held_in_g2(manager) -> int:
    return manager.pool(Tier.G2).num_in_use


def test_a_prefetch_returns_at_once_and_its_lookup_reads_no_disk(tmp_path, monkeypatch):
    config, tokens, expected = stored_on_disk(tmp_path, 31)
    with BlockManager(config) as manager:
        assert manager.locate(tokens) == [Tier.G3] * BLOCKS
        gate = GatedReads(monkeypatch)

        fetch = manager.prefetch(tokens)  # the read waits at the gate: this did not

        assert not fetch.done() and fetch.num_blocks == 0
        with pytest.raises(TimeoutError):
            fetch.wait(timeout=0.05)
        gate.open()
        assert fetch.wait(timeout=10) == {Tier.G3: BLOCKS}
        assert fetch.done() and fetch.num_blocks == BLOCKS
        assert held_in_g2(manager) == BLOCKS
        assert manager.locate(tokens) == [Tier.G2] * BLOCKS
        reads = len(gate.started)

        hit = manager.lookup(tokens, onboard_from=ONLY_G2)

        assert len(gate.started) == reads  # the lookup read nothing from disk
        assert (len(hit.block_ids), hit.misses) == (BLOCKS, 0)
        assert hit.from_tier == {Tier.G1: 0, Tier.G2: BLOCKS}
        assert g1_checksums(manager, hit.block_ids) == [expected[h] for h in hit.hashes]
        assert manager.metrics.onboard_blocks[(Tier.G3, Tier.G2)] == BLOCKS
        assert manager.metrics.prefetched == {Tier.G3: BLOCKS}
        fetch.release()
        fetch.release()  # again: nothing
        manager.free(hit.block_ids)
        nothing_held(manager)
        assert manager.locate(tokens) == [Tier.G1] * BLOCKS


def test_a_prefetch_counts_g1_blocks_holds_g2_ones_and_reads_g3_ones(tmp_path):
    config, tokens, expected = stored_on_disk(tmp_path, 32)
    with BlockManager(config) as manager:
        for blocks in (3, 1):  # blocks 0-2 come up through G2, then G1 has block 0 only
            hit = manager.lookup(tokens, max_blocks=blocks)
            manager.free(hit.block_ids)
            if blocks == 3:
                evict_g1(manager)
        assert manager.locate(tokens) == [Tier.G1, Tier.G2, Tier.G2] + [Tier.G3] * 4

        with manager.prefetch(tokens) as fetch:
            assert fetch.wait(timeout=10) == {Tier.G1: 1, Tier.G2: 2, Tier.G3: 4}
            assert held_in_g2(manager) == 6  # G1's block is not held
            hit = manager.lookup(tokens, onboard_from=ONLY_G2)
            assert hit.from_tier == {Tier.G1: 1, Tier.G2: 6}
            assert g1_checksums(manager, hit.block_ids) == [expected[h] for h in hit.hashes]
        manager.free(hit.block_ids)
        nothing_held(manager)


def test_a_prefetch_from_a_later_block_leaves_the_blocks_before_it_to_the_engine(tmp_path):
    """``first_block=3``: blocks 3 to 6 read into G2 while the engine computes 0 to 2 (as
    ``read_split`` advises); the lookup after both finds 0 to 2 in G1 and the rest in G2."""
    config, tokens, expected = stored_on_disk(tmp_path, 46)
    with BlockManager(config) as manager:
        with manager.prefetch(tokens, first_block=3) as fetch:
            head = manager.lookup(tokens, max_blocks=3, onboard_from=WITHOUT_DISK)
            assert (head.block_ids, head.misses) == ([], 3)
            computed = manager.allocate(3)  # the engine computes blocks 0 to 2 meanwhile
            write_random(manager, computed, torch.Generator().manual_seed(47))
            manager.register(computed, tokens[: 3 * BS])
            sums = g1_checksums(manager, computed)

            assert fetch.wait(timeout=10) == {Tier.G3: BLOCKS - 3}
            assert manager.metrics.onboard_blocks[(Tier.G3, Tier.G2)] == BLOCKS - 3
            manager.flush()  # the offload of the computed blocks held G2 blocks too
            assert held_in_g2(manager) == BLOCKS - 3
            hit = manager.lookup(tokens, onboard_from=ONLY_G2)
        assert hit.from_tier == {Tier.G1: 3, Tier.G2: BLOCKS - 3}
        assert hit.block_ids[:3] == computed
        tail = [expected[h] for h in hit.hashes[3:]]
        assert g1_checksums(manager, hit.block_ids) == sums + tail
        manager.free(computed + hit.block_ids)
        nothing_held(manager)


@pytest.mark.parametrize(("first_block", "counts"), [(0, {Tier.G3: BLOCKS}), (6, {Tier.G3: 1})])
def test_a_prefetch_from_a_block_past_the_prefix_or_the_prompt_reads_nothing(
    tmp_path, first_block, counts
):
    config, tokens, _ = stored_on_disk(tmp_path, 48)
    with BlockManager(config) as manager:
        with manager.prefetch(tokens, first_block=first_block) as fetch:
            assert fetch.wait(timeout=10) == counts
        for past in (BLOCKS, BLOCKS + 5):
            with manager.prefetch(tokens[: 6 * BS] + [1] * BS, first_block=past) as fetch:
                assert fetch.wait(timeout=10) == {} and fetch.num_blocks == 0
        nothing_held(manager)


def test_a_bad_block_ends_the_prefetched_prefix(tmp_path, monkeypatch):
    monkeypatch.setattr(prefetch, "PREFETCH_SHARE", 1)
    config, tokens, expected = stored_on_disk(tmp_path, 33)
    with BlockManager(config) as manager:
        flip_g3_byte(manager, sequence_hashes(tokens, BS)[4], 3)

        with manager.prefetch(tokens) as fetch:
            assert fetch.wait(timeout=10) == {Tier.G3: 4}
            assert held_in_g2(manager) == 4
            assert manager.metrics.corrupt_blocks == 1
            assert manager.locate(tokens)[4:] == [None, Tier.G3, Tier.G3]
            hit = manager.lookup(tokens, onboard_from=ONLY_G2)
        assert (len(hit.block_ids), hit.misses) == (4, 3)
        assert g1_checksums(manager, hit.block_ids) == [expected[h] for h in hit.hashes]
        manager.free(hit.block_ids)
        nothing_held(manager)


def test_a_failed_read_is_raised_by_wait_and_nothing_stays_held(tmp_path, monkeypatch):
    config, tokens, _ = stored_on_disk(tmp_path, 34)
    with BlockManager(config) as manager:
        hit = manager.lookup(tokens, max_blocks=2)  # G2 holds blocks 0 and 1: held, then let go
        manager.free(hit.block_ids)
        manager.free(manager.allocate(config.device_blocks))

        def fails(allocation, spans, pool=None):
            raise StorageError("injected read error", allocation.path)

        monkeypatch.setattr(disk.DiskAllocation, "read", fails)
        fetch = manager.prefetch(tokens)
        with pytest.raises(TransferError, match="injected read error"):
            fetch.wait(timeout=10)
        assert fetch.done() and fetch.num_blocks == 0
        fetch.release()
        nothing_held(manager)


def test_a_prefetch_released_before_it_starts_reads_nothing(tmp_path, monkeypatch):
    config, tokens, _ = stored_on_disk(tmp_path, 35)
    with BlockManager(config) as manager:
        gate = GatedReads(monkeypatch)
        first = manager.prefetch(tokens)  # under way, waiting at the gate
        second = manager.prefetch(tokens)  # queued behind it

        second.release()
        gate.open()

        assert first.wait(timeout=10) == {Tier.G3: BLOCKS}
        with pytest.raises(CancelledError):
            second.wait(timeout=10)
        assert second.done() and second.num_blocks == 0
        assert len(gate.started) == 1  # the first's one chunk
        assert held_in_g2(manager) == BLOCKS  # the second would have held one more
        first.release()
        nothing_held(manager)


def test_a_prefetch_released_while_it_reads_lets_its_blocks_go_when_done(tmp_path, monkeypatch):
    config, tokens, _ = stored_on_disk(tmp_path, 37)
    with BlockManager(config) as manager:
        gate = GatedReads(monkeypatch)
        fetch = manager.prefetch(tokens)
        while not gate.started:  # the read has begun
            threading.Event().wait(0.001)

        fetch.release()
        gate.open()

        manager.prefetch([]).wait(timeout=10)  # the one thread has finished the first
        assert fetch.done() and fetch.num_blocks == 0
        with pytest.raises(CancelledError):
            fetch.wait(timeout=0)
        nothing_held(manager)
        assert manager.locate(tokens) == [Tier.G2] * BLOCKS  # read, cached, not held


def test_a_lookup_that_does_not_wait_for_the_prefetch_reads_the_disk_beside_it(
    tmp_path, monkeypatch
):
    config, tokens, expected = stored_on_disk(tmp_path, 44)
    with BlockManager(config) as manager:
        gate = GatedReads(monkeypatch)
        fetch = manager.prefetch(tokens)
        while not gate.started:  # the prefetch's read has begun
            threading.Event().wait(0.001)
        threading.Timer(0.05, gate.open).start()

        hit = manager.lookup(tokens)  # reads the same G3 blocks into staging blocks of its own

        assert fetch.wait(timeout=10) == {Tier.G3: BLOCKS}
        assert (len(hit.block_ids), hit.from_tier[Tier.G3]) == (BLOCKS, BLOCKS)
        assert g1_checksums(manager, hit.block_ids) == [expected[h] for h in hit.hashes]
        g2 = manager.pool(Tier.G2)
        assert held_in_g2(manager) == BLOCKS  # the blocks that cache the hashes, once each
        assert all(g2.refcount(g2.lookup(h)) == 1 for h in hit.hashes)
        fetch.release()
        manager.free(hit.block_ids)
        nothing_held(manager)


def test_an_asyncio_scheduler_awaits_a_prefetch_through_its_callback(tmp_path, monkeypatch):
    config, tokens, expected = stored_on_disk(tmp_path, 46)
    with BlockManager(config) as manager:
        gate = GatedReads(monkeypatch)

        async def schedule():
            loop = asyncio.get_running_loop()
            arrived = loop.create_future()
            fetch = manager.prefetch(tokens)
            fetch.add_done_callback(lambda f: loop.call_soon_threadsafe(arrived.set_result, f))
            steps = 0
            while not arrived.done():  # the other requests' steps
                steps += 1
                if steps == 3:
                    gate.open()
                await asyncio.sleep(0.001)
            return await arrived, steps

        fetch, steps = asyncio.run(schedule())

        assert steps >= 3 and fetch.done()
        assert fetch.wait(timeout=0) == {Tier.G3: BLOCKS}
        seen = []
        fetch.add_done_callback(seen.append)  # done already: called at once
        assert seen == [fetch]
        with fetch:
            hit = manager.lookup(tokens, onboard_from=ONLY_G2)
        assert g1_checksums(manager, hit.block_ids) == [expected[h] for h in hit.hashes]
        manager.free(hit.block_ids)
        nothing_held(manager)


def test_the_callback_of_a_prefetch_released_before_it_starts_runs_on_release(
    tmp_path, monkeypatch
):
    config, tokens, _ = stored_on_disk(tmp_path, 47)
    with BlockManager(config) as manager:
        gate = GatedReads(monkeypatch)
        first = manager.prefetch(tokens)
        second = manager.prefetch(tokens)
        seen = []
        second.add_done_callback(lambda f: seen.append(threading.current_thread()))

        second.release()

        assert seen == [threading.current_thread()]
        gate.open()
        first.release()
        manager.prefetch([]).wait(timeout=10)
        nothing_held(manager)


def test_prefetches_hold_at_most_their_share_of_g2(tmp_path):
    config, tokens, expected = stored_on_disk(tmp_path, 38, g2=4)
    with BlockManager(config) as manager:
        first = manager.prefetch(tokens)
        assert first.wait(timeout=10) == {Tier.G3: 4 // prefetch.PREFETCH_SHARE}
        second = manager.prefetch(tokens)
        assert second.wait(timeout=10) == {}  # the share is taken
        assert held_in_g2(manager) == 2
        first.release()
        with manager.prefetch(tokens) as third:
            assert third.wait(timeout=10) == {Tier.G2: 2}
        second.release()
        nothing_held(manager)


def test_closing_the_manager_cancels_queued_prefetches_and_lets_go(tmp_path, monkeypatch):
    config, tokens, _ = stored_on_disk(tmp_path, 39)
    manager = BlockManager(config)
    gate = GatedReads(monkeypatch)
    first = manager.prefetch(tokens)
    second = manager.prefetch(tokens)
    threading.Timer(0.05, gate.open).start()

    manager.close()

    assert first.done() and second.done()
    with pytest.raises(CancelledError):
        second.wait(timeout=0)
    with pytest.raises(InvalidArgumentError, match="manager is closed"):
        manager.prefetch(tokens)


def test_a_sliding_window_prefetch_brings_the_window_only(tmp_path):
    config = make_config(tmp_path, g1=16, g2=16, g3=32, sliding_window=2 * BS)
    tokens = tokens_of(40, BLOCKS * BS)
    with BlockManager(config) as manager:
        expected = store(manager, tokens, torch.Generator().manual_seed(40))
        manager.flush()
    with BlockManager(config) as manager:
        window = blocks_needed(config.sliding_window, BS)
        # From a block before the window: the window; from its last block: that one.
        for first_block, counts in ((1, {Tier.G3: window}), (BLOCKS - 1, {Tier.G2: 1})):
            with manager.prefetch(tokens, first_block=first_block) as fetch:
                assert fetch.wait(timeout=10) == counts
        with manager.prefetch(tokens) as fetch:
            assert fetch.wait(timeout=10) == {Tier.G2: window}
            before = BLOCKS - window
            assert manager.locate(tokens) == [Tier.G3] * before + [Tier.G2] * window
            hit = manager.lookup(tokens, onboard_from=ONLY_G2)
        assert (hit.skipped, len(hit.block_ids), hit.misses) == (before, window, 0)
        assert g1_checksums(manager, hit.block_ids) == [expected[h] for h in hit.hashes]
        manager.free(hit.block_ids)
        nothing_held(manager)


def test_the_groups_of_a_hybrid_model_prefetch_each_then_look_up_together(tmp_path):
    """A full-attention group and a window group (a manager each, on a G3 file each): one
    prefetch per group, then ``lookup_groups`` from G2 only."""
    tokens = tokens_of(45, BLOCKS * BS)
    configs, expected = [], []
    for i, window in enumerate((None, 2 * BS)):
        folder = tmp_path / str(i)
        folder.mkdir()
        configs.append(make_config(folder, g1=16, g2=16, g3=32, sliding_window=window))
        with BlockManager(configs[-1]) as manager:
            expected.append(store(manager, tokens, torch.Generator().manual_seed(45 + i)))
            manager.flush()
    managers = [BlockManager(config) for config in configs]
    try:
        fetches = [manager.prefetch(tokens) for manager in managers]
        window = blocks_needed(2 * BS, BS)
        assert [f.wait(timeout=10) for f in fetches] == [{Tier.G3: BLOCKS}, {Tier.G3: window}]

        hits = lookup_groups(managers, tokens, onboard_from=ONLY_G2)

        for manager, hit, sums, fetch in zip(managers, hits, expected, fetches, strict=True):
            assert hit.num_tokens == BLOCKS * BS
            assert g1_checksums(manager, hit.block_ids) == [sums[h] for h in hit.hashes]
            fetch.release()
            manager.free(hit.block_ids)
            nothing_held(manager)
    finally:
        for manager in managers:
            manager.close()


def test_prefetch_checks_its_arguments(tmp_path):
    config, tokens, _ = stored_on_disk(tmp_path, 41)
    with BlockManager(config) as manager:
        with pytest.raises(InvalidArgumentError, match="ask_peer"):
            manager.prefetch(tokens, ask_peer="tcp://nowhere:1")
        with pytest.raises(InvalidArgumentError, match="max_blocks"):
            manager.prefetch(tokens, max_blocks=-1)
        for bad in (-1, 1.0, True, None):
            with pytest.raises(InvalidArgumentError, match="first_block"):
                manager.prefetch(tokens, first_block=bad)
        with manager.prefetch(tokens, max_blocks=2) as fetch:
            assert fetch.wait(timeout=10) == {Tier.G3: 2}
        nothing_held(manager)
    with BlockManager(make_config(tmp_path, g2=0, g3=0)) as manager:
        with pytest.raises(InvalidArgumentError, match="config.enable_offload"):
            manager.prefetch(tokens)


@pytest.mark.skipif(not importlib.util.find_spec("prometheus_client"), reason="no prometheus")
def test_prefetched_blocks_are_counted_for_prometheus(tmp_path):
    from prometheus_client import generate_latest

    config, tokens, _ = stored_on_disk(tmp_path, 42)
    with BlockManager(config) as manager:
        with manager.prefetch(tokens) as fetch:
            fetch.wait(timeout=10)
        text = generate_latest(prometheus_registry(manager.metrics)).decode()
    assert f'kvbm_prefetched_blocks_total{{tier="DISK"}} {float(BLOCKS)}' in text


@pytest.mark.skipif(not nixl_available(), reason="NIXL is not installed")
def test_a_prefetch_reads_the_blocks_after_the_local_ones_from_a_peer(tmp_path):
    pytest.importorskip("zmq")
    pytest.importorskip("msgpack")
    from tests.test_sharing import LOCAL, assert_g1_holds, let_go, poison_g1, worker
    from tests.test_sharing import store as store_kv

    tokens = tokens_of(43, 6 * BS)
    with worker(tmp_path) as there, worker(tmp_path) as here:
        kv = store_kv(there, tokens, torch.Generator().manual_seed(43))
        here.add_peer(there.serve(LOCAL))
        poison_g1(here)

        with here.prefetch(tokens) as fetch:
            assert fetch.wait(timeout=10) == {Tier.G4: 6}
            assert let_go(there)
            hit = here.lookup(tokens, onboard_from=ONLY_G2)
        assert hit.from_tier == {Tier.G1: 0, Tier.G2: 6}
        assert_g1_holds(here, hit.block_ids, kv)
        here.free(hit.block_ids)
        assert held_in_g2(here) == 0


@pytest.mark.skipif(not nixl_available(), reason="NIXL is not installed")
def test_a_prefetch_reads_the_peers_blocks_while_the_disk_reads_its_own(tmp_path, monkeypatch):
    """Blocks 3 to 5 in G3 only here, 6 in G2, 7 to 9 at a peer: the peer's blocks come in
    while the disk's reads wait at a gate; both are held once the gate opens."""
    pytest.importorskip("zmq")
    pytest.importorskip("msgpack")
    from tests.test_sharing import assert_g1_holds, let_go, mixed_here_and_at_a_peer, poison_g1

    monkeypatch.setattr(prefetch, "PREFETCH_SHARE", 1)  # G2 has 8 blocks: all for prefetches
    here, there, _, tokens, expected, kv = mixed_here_and_at_a_peer(tmp_path, 44)
    with here, there:
        poison_g1(here)
        head = here.lookup(tokens, max_blocks=3, onboard_from=ONLY_G2)  # G2 may evict them
        gate = GatedReads(monkeypatch)
        with here.prefetch(tokens, first_block=3) as fetch:
            deadline = time.monotonic() + 10
            while here.metrics.onboard_blocks[(Tier.G4, Tier.G2)] < 3:
                assert time.monotonic() < deadline, "the peer was not read beside the disk"
                time.sleep(0.005)
            assert gate.started and not fetch.done()
            gate.open()
            assert fetch.wait(timeout=10) == {Tier.G2: 1, Tier.G3: 3, Tier.G4: 3}
            assert let_go(there)
            hit = here.lookup(tokens, onboard_from=ONLY_G2)
        assert hit.from_tier == {Tier.G1: 3, Tier.G2: 7}
        assert g1_checksums(here, hit.block_ids[:7]) == [expected[h] for h in hit.hashes[:7]]
        assert_g1_holds(here, hit.block_ids[7:], [t[7:] for t in kv])
        here.free(head.block_ids + hit.block_ids)
        nothing_held(here)
