"""Lookups that return before their copies into G1 end (``lookup(..., wait=False)``): the
layer groups, waiting per layer, holds kept until the copies end, hits that share blocks still
being copied, failed copies."""

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kvblocks.errors import InvalidArgumentError, TransferError
from kvblocks.pool import BlockManager, BlockManagerConfig, Tier
from kvblocks.pool.ready import ReadyLayers, layer_groups
from kvblocks.transfer import TransferCompleteNotification
from tests.helpers import assert_bits_equal

BS = 4  # tokens per block
NL = 5  # layers


def make_config(tmp_path, g1=8, g2=16, groups=3, **overrides) -> BlockManagerConfig:
    fields = dict(num_layers=NL, num_kv_heads=2, head_dim=16, block_size=BS, dtype="bf16")
    fields.update(overrides)
    block = BlockManagerConfig(**fields).block_bytes
    return BlockManagerConfig(
        **fields,
        device_blocks=g1,
        enable_offload=True,
        host_cache_gb=g2 * block / 2**30,
        offload_path=str(tmp_path),
        onboard_layer_groups=groups,
    )


def tokens_of(seed, n):
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


def store(manager, tokens, gen) -> dict[int, list[torch.Tensor]]:
    """Compute a request's KV (random) and register it; returns each block's KV per layer,
    by hash."""
    full = len(tokens) // BS
    blocks = manager.allocate(full)
    for t in manager.device_tensors:
        index = torch.tensor(blocks, dtype=torch.long, device=t.device)
        t[index] = torch.randn((full, *t.shape[1:]), generator=gen).to(t.device, t.dtype)
    hashes = manager.register(blocks, tokens[: full * BS])
    kv = {
        h: [t[b].clone() for t in manager.device_tensors]
        for h, b in zip(hashes, blocks, strict=True)
    }
    manager.free(blocks)
    return kv


def poison_g1(manager):
    """Evict every cached G1 block and fill G1 with a pattern no stored block holds."""
    manager.flush()
    blocks = manager.allocate(manager.pool(Tier.G1).num_blocks)
    for t in manager.device_tensors:
        t.view(torch.int16)[torch.tensor(blocks, device=t.device)] = -1  # NaN in bf16
    manager.free(blocks)


def assert_layer(manager, hit, kv, layer):
    for b, h in zip(hit.block_ids, hit.hashes, strict=True):
        assert_bits_equal(manager.device_tensors[layer][b].cpu(), kv[h][layer].cpu())


#: The gate below holds back copies that run on worker threads, as they do without a GPU; on
#: a GPU they are enqueued on a stream instead (the gpu test at the end covers that).
host_copies = pytest.mark.skipif(
    torch.cuda.is_available(), reason="copies into G1 run on a CUDA stream here"
)


class GatedCopies:
    """Stands in for a manager's ``execute_layer_groups`` (the copies into G1): records each
    group's layer range and holds back the groups after the first until :attr:`gate` opens;
    with ``fail``, every group waits for the gate and then fails with it."""

    def __init__(self, manager, fail=None):
        self.real = manager._transfer.execute_layer_groups
        self.gate = threading.Event()
        self.ranges = []
        self.fail = fail
        self._threads = ThreadPoolExecutor(4)

    def __call__(self, src, src_ids, dst, dst_ids, groups, options=None):
        done = []
        for group in groups:
            self.ranges.append(group)
            if group.start == 0 and self.fail is None:
                done += self.real(src, src_ids, dst, dst_ids, [group], options)
                continue

            def later(group=group):
                assert self.gate.wait(30)
                if self.fail is not None:
                    raise self.fail
                (notification,) = self.real(src, src_ids, dst, dst_ids, [group], options)
                notification.wait()

            done.append(TransferCompleteNotification.from_future(self._threads.submit(later)))
        return tuple(done)


@pytest.fixture
def gated(tmp_path, monkeypatch):
    """A manager with one 3-block prompt in G2 only, G1 poisoned, copies into G1 gated."""
    manager = BlockManager(make_config(tmp_path))
    tokens = tokens_of(1, 3 * BS)
    kv = store(manager, tokens, torch.Generator().manual_seed(1))
    poison_g1(manager)
    copies = GatedCopies(manager)
    monkeypatch.setattr(manager._transfer, "execute_layer_groups", copies)
    yield manager, tokens, kv, copies
    copies.gate.set()
    monkeypatch.undo()
    manager.close()


# Layer groups ----------------------------------------------------------------------------------


def test_layer_groups_cover_the_layers_in_order_and_in_even_parts():
    rng = random.Random(0)
    for _ in range(300):
        num_layers, count = rng.randrange(1, 130), rng.randrange(1, 140)
        groups = layer_groups(num_layers, count)
        assert len(groups) == min(count, num_layers)
        assert [layer for g in groups for layer in g] == list(range(num_layers))
        sizes = [len(g) for g in groups]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


# Returning before the copies end ---------------------------------------------------------------


@host_copies
def test_a_lookup_that_does_not_wait_lets_each_layer_be_waited_for(gated):
    manager, tokens, kv, copies = gated
    hit = manager.lookup(tokens, wait=False)
    assert hit.from_tier == {Tier.G1: 0, Tier.G2: 3} and len(hit.block_ids) == 3
    assert copies.ranges == [range(0, 2), range(2, 4), range(4, 5)]
    hit.ready.wait_layer(1)  # the first group was not held back
    assert_layer(manager, hit, kv, 0)
    assert_layer(manager, hit, kv, 1)
    assert not hit.ready.done()
    copies.gate.set()
    for layer in range(NL):
        hit.ready.wait_layer(layer)
        assert_layer(manager, hit, kv, layer)
    assert hit.ready.done()
    manager.free(hit.block_ids)
    manager.flush()
    g1 = manager.pool(Tier.G1)
    assert all(g1.refcount(b) == 0 for b in hit.block_ids)  # cached, nobody holds them
    assert manager.occupancy()[Tier.G2].allocated == 0
    g1.check_invariants()


@host_copies
def test_blocks_freed_before_their_copies_end_are_not_reused_until_then(gated):
    manager, tokens, kv, copies = gated
    hit = manager.lookup(tokens, wait=False)
    g2_held = manager.occupancy()[Tier.G2].allocated
    assert g2_held == 3  # the sources, until the copies end
    manager.free(hit.block_ids)  # the request was cancelled
    g1 = manager.pool(Tier.G1)
    assert all(g1.refcount(b) == 1 for b in hit.block_ids)  # the manager's hold
    others = manager.allocate(g1.num_available)
    assert not set(others) & set(hit.block_ids)
    manager.free(others)
    copies.gate.set()
    manager.flush()
    assert manager.occupancy()[Tier.G2].allocated == 0
    again = manager.lookup(tokens)
    assert again.block_ids == hit.block_ids and again.from_tier == {Tier.G1: 3}
    for layer in range(NL):
        assert_layer(manager, again, kv, layer)
    manager.free(again.block_ids)


@host_copies
def test_a_hit_on_blocks_still_being_copied_waits_for_those_copies(gated):
    manager, tokens, kv, copies = gated
    first = manager.lookup(tokens, wait=False)
    second = manager.lookup(tokens[: 2 * BS], wait=False)
    assert second.block_ids == first.block_ids[:2] and second.from_tier == {Tier.G1: 2}
    assert not second.ready.done()
    opener = threading.Timer(0.2, copies.gate.set)
    opener.start()
    third = manager.lookup(tokens)  # waits, for the first lookup's copies too
    opener.join()
    assert third.ready.done() and third.block_ids == first.block_ids
    for layer in range(NL):
        assert_layer(manager, third, kv, layer)
    second.ready.synchronize()
    manager.free(first.block_ids + second.block_ids + third.block_ids)
    manager.flush()
    manager.pool(Tier.G1).check_invariants()


@host_copies
def test_allocating_past_blocks_being_copied_waits_for_the_copies(gated):
    manager, tokens, kv, copies = gated
    hit = manager.lookup(tokens, wait=False)
    manager.free(hit.block_ids)
    opener = threading.Timer(0.2, copies.gate.set)
    opener.start()
    every = manager.allocate(manager.pool(Tier.G1).num_blocks)
    opener.join()
    assert sorted(every) == list(range(manager.pool(Tier.G1).num_blocks))
    assert hit.ready.done()
    manager.free(every)


@host_copies
def test_a_failed_copy_is_raised_by_the_waits_and_its_blocks_leave_the_cache(tmp_path):
    manager = BlockManager(make_config(tmp_path))
    try:
        tokens = tokens_of(2, 3 * BS)
        kv = store(manager, tokens, torch.Generator().manual_seed(2))
        poison_g1(manager)
        copies = GatedCopies(manager, fail=OSError("the link went down"))
        manager._transfer.execute_layer_groups = copies
        hit = manager.lookup(tokens, wait=False)
        copies.gate.set()
        with pytest.raises(TransferError, match="the link went down"):
            hit.ready.wait_layer(NL - 1)
        manager.free(hit.block_ids)
        manager.flush()
        assert manager.occupancy()[Tier.G1].cached == 0
        del manager._transfer.execute_layer_groups
        again = manager.lookup(tokens)  # from G2 again, whole
        assert again.from_tier == {Tier.G1: 0, Tier.G2: 3}
        for layer in range(NL):
            assert_layer(manager, again, kv, layer)
        manager.free(again.block_ids)
        manager.pool(Tier.G1).check_invariants()
    finally:
        manager.close()


@host_copies
def test_a_waiting_lookup_whose_copy_fails_raises_and_holds_nothing(tmp_path):
    manager = BlockManager(make_config(tmp_path))
    try:
        tokens = tokens_of(3, 3 * BS)
        store(manager, tokens, torch.Generator().manual_seed(3))
        poison_g1(manager)
        copies = GatedCopies(manager, fail=OSError("the link went down"))
        copies.gate.set()
        manager._transfer.execute_layer_groups = copies
        with pytest.raises(TransferError, match="the link went down"):
            manager.lookup(tokens)
        assert manager.occupancy()[Tier.G1].allocated == 0
        assert manager.occupancy()[Tier.G1].cached == 0
        assert manager.occupancy()[Tier.G2].allocated == 0
    finally:
        manager.close()


@host_copies
def test_a_waiting_lookup_copies_all_layers_at_once(tmp_path, monkeypatch):
    with BlockManager(make_config(tmp_path)) as manager:
        tokens = tokens_of(4, 3 * BS)
        kv = store(manager, tokens, torch.Generator().manual_seed(4))
        poison_g1(manager)
        copies = GatedCopies(manager)
        monkeypatch.setattr(manager._transfer, "execute_layer_groups", copies)
        hit = manager.lookup(tokens)
        assert copies.ranges == [range(NL)] and hit.ready.done()
        for layer in range(NL):
            assert_layer(manager, hit, kv, layer)
        manager.free(hit.block_ids)


@host_copies
def test_a_sliding_window_lookup_can_return_before_its_copies_end(tmp_path, monkeypatch):
    config = make_config(tmp_path, sliding_window=2 * BS + 1)  # the last 2 blocks
    with BlockManager(config) as manager:
        tokens = tokens_of(5, 5 * BS)
        kv = store(manager, tokens, torch.Generator().manual_seed(5))
        poison_g1(manager)
        copies = GatedCopies(manager)
        monkeypatch.setattr(manager._transfer, "execute_layer_groups", copies)
        hit = manager.lookup(tokens, wait=False)
        assert hit.skipped == 3 and len(hit.block_ids) == 2
        copies.gate.set()
        hit.ready.wait()
        for layer in range(NL):
            assert_layer(manager, hit, kv, layer)
        manager.free(hit.block_ids)


# Arguments -------------------------------------------------------------------------------------


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(InvalidArgumentError, match="onboard_layer_groups"):
        make_config(tmp_path, groups=0)
    with BlockManager(make_config(tmp_path)) as manager:
        with pytest.raises(InvalidArgumentError, match="wait must be a bool"):
            manager.lookup(tokens_of(6, BS), wait="no")
        hit = manager.lookup(tokens_of(6, BS), wait=False)
        for bad in (-1, NL, 1.0, True):
            with pytest.raises(InvalidArgumentError, match="layer must be in"):
                hit.ready.wait_layer(bad)
    nothing = ReadyLayers()
    nothing.wait_layer(1000)  # nothing to wait for, whatever the layer
    assert nothing.done()


# On the GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_on_the_gpu_the_lookup_returns_at_once_and_each_layer_is_waited_for_on_the_stream(
    tmp_path,
):
    """The current stream is kept busy (a GPU sleep) when the lookup is called: the copies
    queue behind it, so the lookup returns before they end; reads of each layer queued on the
    stream after ``wait_layer`` see that layer's KV, never the poison G1 held."""
    config = make_config(tmp_path, g1=40, g2=40, groups=NL, num_kv_heads=8, head_dim=128)
    with BlockManager(config) as manager:
        tokens = tokens_of(7, 32 * BS)
        kv = store(manager, tokens, torch.Generator().manual_seed(7))
        poison_g1(manager)
        warm_up = manager.lookup(tokens, wait=False)  # compiles the kernels of one layer
        warm_up.ready.synchronize()
        manager.free(warm_up.block_ids)
        poison_g1(manager)
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # about 0.1 s at 2 GHz
        first = manager.lookup(tokens, wait=False)
        assert not first.ready.done() and first.from_tier == {Tier.G1: 0, Tier.G2: 32}
        hit = manager.lookup(tokens, wait=False)  # shares the blocks still being copied
        assert hit.block_ids == first.block_ids and hit.from_tier == {Tier.G1: 32}
        assert not hit.ready.done()
        manager.free(first.block_ids)
        index = torch.tensor(hit.block_ids, device="cuda")
        reads = []
        for layer in range(NL):
            hit.ready.wait_layer(layer)
            reads.append(manager.device_tensors[layer].index_select(0, index))
        torch.cuda.synchronize()
        assert hit.ready.done()
        for layer, got in enumerate(reads):
            for row, h in zip(got, hit.hashes, strict=True):
                assert_bits_equal(row.cpu(), kv[h][layer].cpu())
        manager.free(hit.block_ids)
