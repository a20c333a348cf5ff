"""BlockManager: tiers, offload and onboard, the G3 journal, crash safety, corruption."""

import errno
import fcntl
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from kvblocks.demo import count_mismatches, g1_regions, write_pattern
from kvblocks.errors import InvalidArgumentError, StorageError, TransferError
from kvblocks.layout import KvBlockLayout
from kvblocks.pool import (
    AllBlocksCleared,
    BlockManager,
    BlockManagerConfig,
    BlockRemoved,
    BlockStateError,
    BlockStored,
    DeviceLayout,
    InProcessPublisher,
    PoolExhaustedError,
    Tier,
    sequence_hashes,
)
from kvblocks.transfer import block_checksums
from tests.helpers import assert_bits_equal, random_tensor

BS = 4  # tokens per block


def make_config(tmp_path, g1=8, g2=12, g3=40, **overrides) -> BlockManagerConfig:
    fields = dict(num_layers=2, num_kv_heads=2, head_dim=16, block_size=BS, dtype="bf16")
    fields.update(overrides)
    block = BlockManagerConfig(**fields).block_bytes
    return BlockManagerConfig(
        **fields,
        device_blocks=g1,
        enable_offload=g2 > 0,
        host_cache_gb=g2 * block / 2**30,
        disk_cache_gb=g3 * block / 2**30,
        offload_path=str(tmp_path),
    )


def write_random(manager: BlockManager, blocks: list[int], gen: torch.Generator) -> None:
    """Random KV into G1 blocks, every layer."""
    for t in manager.device_tensors:
        data = torch.randn((len(blocks), *t.shape[1:]), generator=gen).to(t.dtype)
        t[torch.tensor(blocks, dtype=torch.long, device=t.device)] = data.to(t.device)


def store(manager, tokens, gen):
    """A request: look up, allocate the rest, write it, register, free. Returns the G1
    checksum of each full block, by hash."""
    hit = manager.lookup(tokens)
    full = len(tokens) // BS
    new = manager.allocate(full - len(hit.block_ids))
    write_random(manager, new, gen)
    hashes = manager.register(
        new, tokens[len(hit.block_ids) * BS : full * BS], parent_hash=hit.last_hash
    )
    blocks = hit.block_ids + new
    sums = dict(
        zip(hit.hashes + hashes, block_checksums(manager.layout(Tier.G1), blocks), strict=True)
    )
    manager.free(blocks)
    return sums


def evict_g1(manager):
    """Fill G1 with unrelated blocks so every cached G1 block is evicted."""
    blocks = manager.allocate(manager.pool(Tier.G1).num_blocks)
    manager.free(blocks)


def recording_publisher():
    """An in-process publisher and the list its batches are appended to."""
    publisher = InProcessPublisher()
    batches = []
    publisher.subscribe(batches.append)
    return publisher, batches


def check_all_pools(manager):
    for tier in manager.tiers:
        manager.pool(tier).check_invariants()


def flip_g3_byte(manager, seq_hash, offset):
    """Corrupt the G3 copy of a block: flip every bit of its byte at ``offset``."""
    g3 = manager.layout(Tier.G3)
    region = g3.layout.block_region(manager.pool(Tier.G3).lookup(seq_hash))
    with open(g3.file.path, "r+b") as f:
        f.seek(region.addr + offset)
        byte = f.read(1)
        f.seek(region.addr + offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def tokens_of(seed, n):
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


# Config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_layers", 0),
        ("head_dim", 1.5),
        ("block_size", -1),
        ("device_blocks", 0),
        ("gpu_memory_fraction", 0),
        ("gpu_memory_fraction", 1.5),
        ("host_cache_gb", -1),
        ("disk_cache_gb", float("nan")),
        ("dtype", "int3"),
        ("enable_offload", "yes"),
        ("device_layout", "outer_first"),
        ("disk_cache_key", ""),
        ("disk_cache_key", 3),
    ],
)
def test_config_rejects_bad_values_naming_them(field, value):
    fields = dict(num_layers=2, num_kv_heads=2, head_dim=16, device_blocks=4)
    fields[field] = value
    with pytest.raises(InvalidArgumentError, match=field):
        BlockManagerConfig(**fields)


def test_config_offload_needs_a_host_tier_and_a_directory(tmp_path):
    with pytest.raises(InvalidArgumentError, match="host_cache_gb"):
        BlockManagerConfig(num_layers=2, num_kv_heads=2, head_dim=16, enable_offload=True)
    with pytest.raises(InvalidArgumentError, match="offload_path"):
        BlockManagerConfig(
            num_layers=2,
            num_kv_heads=2,
            head_dim=16,
            enable_offload=True,
            host_cache_gb=0.01,
            disk_cache_gb=0.01,
            offload_path=str(tmp_path / "missing"),
        )


def test_config_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KVBLOCKS_CPU_CACHE_GB", "0.5")
    monkeypatch.setenv("KVBLOCKS_DISK_CACHE_GB", "2")
    config = BlockManagerConfig.from_env(
        num_layers=4, num_kv_heads=8, head_dim=128, block_size=16, offload_path=str(tmp_path)
    )
    assert (config.host_cache_gb, config.disk_cache_gb, config.enable_offload) == (0.5, 2.0, True)
    assert config.host_blocks == (2**29) // config.block_bytes
    assert config.block_bytes == 4 * 2 * 16 * 8 * 128 * 2
    explicit = BlockManagerConfig.from_env(
        num_layers=4, num_kv_heads=8, head_dim=128, host_cache_gb=0.25, offload_path=str(tmp_path)
    )
    assert explicit.host_cache_gb == 0.25  # an argument wins over the environment
    monkeypatch.setenv("KVBLOCKS_CPU_CACHE_GB", "lots")
    with pytest.raises(InvalidArgumentError, match="KVBLOCKS_CPU_CACHE_GB"):
        BlockManagerConfig.from_env(num_layers=4, num_kv_heads=8, head_dim=128)
    monkeypatch.setenv("KVBLOCKS_CPU_CACHE_GB", "-1")
    with pytest.raises(InvalidArgumentError, match="KVBLOCKS_CPU_CACHE_GB"):
        BlockManagerConfig.from_env(num_layers=4, num_kv_heads=8, head_dim=128)
    with pytest.raises(InvalidArgumentError, match="num_blocks"):
        BlockManagerConfig.from_env(num_layers=4, num_kv_heads=8, head_dim=128, num_blocks=3)


def test_manager_needs_device_blocks_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU sizes G1 itself")
    with pytest.raises(InvalidArgumentError, match="device_blocks"):
        BlockManager(BlockManagerConfig(num_layers=2, num_kv_heads=2, head_dim=16))


def test_device_tensors_must_match_the_config(tmp_path):
    config = make_config(tmp_path, g2=0, g3=0)
    good = [torch.zeros(8, 2, BS, 2, 16, dtype=torch.bfloat16) for _ in range(2)]
    with BlockManager(config, device_tensors=good) as manager:
        assert manager.device_tensors[0] is good[0]
    with pytest.raises(InvalidArgumentError, match=r"device_tensors\[1\]"):
        BlockManager(config, device_tensors=[good[0], good[1].float()])
    with pytest.raises(InvalidArgumentError, match="one tensor per layer"):
        BlockManager(config, device_tensors=good[:1])
    with pytest.raises(InvalidArgumentError, match="in layer order, got a dict"):
        BlockManager(config, device_tensors={"layers.0.attn": good[0], "layers.1.attn": good[1]})
    fp8 = make_config(tmp_path, g2=0, g3=0, dtype="fp8_e4m3")
    raw = [t.view(torch.uint8)[..., :16] for t in good]
    with pytest.raises(InvalidArgumentError, match="uint8: give dtype='u8'"):
        BlockManager(fp8, device_tensors=[t.contiguous() for t in raw])
    as_fp8 = [t.contiguous().view(torch.float8_e4m3fn) for t in raw]
    with BlockManager(fp8, device_tensors=as_fp8) as manager:
        assert manager.device_tensors[1] is as_fp8[1]


def read_raw_block(tensors: list[torch.Tensor], config, block: int) -> torch.Tensor:
    """Block ``block`` of an engine's cache as ``[nl, no, *inner]`` on the CPU, read by
    indexing the tensors in their own shape (not through the manager)."""
    layout, nl, no = config.device_layout, config.num_layers, config.outer_dim
    if layout is DeviceLayout.FULLY_CONTIGUOUS:
        return tensors[0][block].cpu()
    if layout is DeviceLayout.OUTER_SEPARATE:  # K0, V0, K1, V1, ...
        return torch.stack([t[block] for t in tensors]).view(nl, no, *tensors[0].shape[1:]).cpu()
    if layout is DeviceLayout.OUTER_FIRST:
        return torch.stack([t[:, block] for t in tensors]).cpu()
    return torch.stack([t[block] for t in tensors]).cpu()


def write_raw_block(tensors: list[torch.Tensor], config, block: int, data: torch.Tensor) -> None:
    """Write ``data`` (``[nl, no, *inner]``) into block ``block`` of an engine's cache."""
    layout, no = config.device_layout, config.outer_dim
    data = data.to(tensors[0].device)
    if layout is DeviceLayout.FULLY_CONTIGUOUS:
        tensors[0][block] = data
        return
    for i, t in enumerate(tensors):
        if layout is DeviceLayout.OUTER_SEPARATE:
            t[block] = data[i // no, i % no]
        elif layout is DeviceLayout.OUTER_FIRST:
            t[:, block] = data[i]
        else:
            t[block] = data[i]


def engine_cache(config: BlockManagerConfig, num_blocks: int, gen) -> list[torch.Tensor]:
    """Random tensors in the shapes ``config.device_layout`` asks for, where G1 would be."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [
        random_tensor(shape, config.dtype, device, gen)
        for shape in config.device_tensor_shapes(num_blocks)
    ]


FORMATS = [KvBlockLayout.OperationalNHD, KvBlockLayout.OperationalHND]


def assert_round_trips(config: BlockManagerConfig, tensors, passed=None) -> None:
    """Blocks written by indexing an engine's cache ``tensors`` (in ``config.device_layout``'s
    shapes; ``passed``, the same memory in the engine's own shapes, is what the manager gets)
    are stored in G2 in the storage format (UniversalTP) and come back from G2 and G3 into
    other G1 blocks unchanged. G1 holds 8 blocks, G2 4."""
    dims = config.dims()
    gen = torch.Generator().manual_seed(11)
    block_shape = (dims.nl, dims.no, *dims.region_shape(config.device_format.inner_order))
    with BlockManager(config, device_tensors=tensors if passed is None else passed) as manager:
        sequences = [tokens_of(20 + s, 4 * BS) for s in range(3)]
        expected = {}
        for tokens in sequences:
            blocks = manager.allocate(4)
            for b in blocks:
                data = random_tensor(block_shape, dims.dtype, generator=gen)
                write_raw_block(tensors, config, b, data)
            hashes = manager.register(blocks, tokens)
            for h, b in zip(hashes, blocks, strict=True):
                expected[h] = read_raw_block(tensors, config, b)
            manager.free(blocks)
        manager.flush()

        g2 = manager.layout(Tier.G2).allocations[0].view().view(dims.dtype)
        g2 = g2[: 4 * dims.block_elems].view(4, dims.nh, dims.nl, dims.no, dims.nt, dims.hd)
        heads = 3 if config.device_format is KvBlockLayout.OperationalNHD else 2
        for h in hashes:  # the last sequence's blocks are the ones in G2
            universal = expected[h].permute(heads, 0, 1, 5 - heads, 4)
            assert_bits_equal(g2[manager.pool(Tier.G2).lookup(h)], universal)

        for tokens in reversed(sequences):  # from G2 first, then from G3
            evict_g1(manager)
            hit = manager.lookup(tokens)
            assert len(hit.block_ids) == 4 and hit.from_tier.get(Tier.G1, 0) == 0, hit
            for b, h in zip(hit.block_ids, hit.hashes, strict=True):
                assert_bits_equal(read_raw_block(tensors, config, b), expected[h])
            manager.free(hit.block_ids)
        assert manager.metrics.hits[Tier.G3] > 0 and manager.metrics.hits[Tier.G2] > 0


@pytest.mark.parametrize("device_format", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("device_layout", list(DeviceLayout), ids=lambda d: d.name)
def test_every_device_layout_round_trips_through_g2_and_g3(tmp_path, device_layout, device_format):
    """An engine's cache in each shape keeps its blocks through G2 and G3."""
    config = make_config(
        tmp_path, g1=8, g2=4, g3=32, device_layout=device_layout, device_format=device_format
    )
    assert_round_trips(config, engine_cache(config, 8, torch.Generator().manual_seed(10)))


@dataclass(frozen=True)
class EngineCache:
    """A cache an engine keeps with dims of size 1 left out, or in raw bytes."""

    device_layout: DeviceLayout
    dtype: str
    head_dim: int
    num_kv_heads: int
    outer_dim: int
    shape: Callable[[int], tuple[int, ...]]  # the engine's shape of one tensor of nb blocks


ENGINE_CACHES = {
    # vLLM's MLA cache, one [num_blocks, block_size, kv_lora_rank + rope_dim] per layer
    "vllm-mla": EngineCache(DeviceLayout.BLOCK_FIRST, "bf16", 36, 1, 1, lambda nb: (nb, BS, 36)),
    # vLLM's fp8_ds_mla: 656 bytes of fp8 values, f32 scales and bf16 values per token, as uint8
    "vllm-fp8-ds-mla": EngineCache(
        DeviceLayout.BLOCK_FIRST, "u8", 41, 1, 1, lambda nb: (nb, BS, 41)
    ),
    # SGLang's MLA pool, kv_buffer[layer][page_size:].view(-1, page_size, dim)
    "sglang-mla": EngineCache(
        DeviceLayout.OUTER_SEPARATE, "bf16", 36, 1, 1, lambda nb: (nb, BS, 36)
    ),
    # vLLM's FlashAttention cache of fp8 K and V, kept as uint8
    "vllm-fp8": EngineCache(
        DeviceLayout.OUTER_FIRST, "u8", 24, 2, 2, lambda nb: (2, nb, BS, 2, 24)
    ),
    # one KV head per rank: [num_blocks, 2, block_size, head_dim]
    "one-kv-head": EngineCache(
        DeviceLayout.BLOCK_FIRST, "f16", 16, 1, 2, lambda nb: (nb, 2, BS, 16)
    ),
}


@pytest.mark.parametrize("engine", list(ENGINE_CACHES))
def test_engine_caches_with_dims_of_size_one_left_out_round_trip(tmp_path, engine):
    """The manager takes an engine's tensors in the engine's own shape (dims of size 1 left
    out) and raw bytes (``u8``); blocks written through those tensors keep their bytes."""
    cache = ENGINE_CACHES[engine]
    config = make_config(
        tmp_path,
        g1=8,
        g2=4,
        g3=32,
        device_layout=cache.device_layout,
        dtype=cache.dtype,
        head_dim=cache.head_dim,
        num_kv_heads=cache.num_kv_heads,
        outer_dim=cache.outer_dim,
    )
    tensors = engine_cache(config, 9, torch.Generator().manual_seed(13))
    if cache.device_layout.block_axis == 0:  # from the second block on, as SGLang's are passed
        tensors = [t[1:] for t in tensors]
    else:
        tensors = [t[:, 1:].contiguous() for t in tensors]
    passed = [t.view(cache.shape(8)) for t in tensors]
    with BlockManager(config, device_tensors=passed) as manager:
        for seen, shape, p in zip(
            manager.device_tensors, config.device_tensor_shapes(8), passed, strict=True
        ):
            assert tuple(seen.shape) == shape and seen.data_ptr() == p.data_ptr()
    assert_round_trips(config, tensors, passed)


def test_left_out_dims_must_be_of_size_one(tmp_path):
    mla = make_config(tmp_path, g2=0, g3=0, num_kv_heads=1, outer_dim=1, head_dim=36)
    good = [torch.zeros(8, BS, 36, dtype=torch.bfloat16) for _ in range(2)]
    with BlockManager(mla, device_tensors=good) as manager:
        assert manager.pool(Tier.G1).num_blocks == 8
    message = r"device_tensors\[1\] must be \[num_blocks, 1, 4, 1, 36\] of torch.bfloat16"
    for bad in (
        torch.zeros(8, 36, BS, dtype=torch.bfloat16),  # the right size, dims in another order
        torch.zeros(8, BS, 35, dtype=torch.bfloat16),  # not a whole number of blocks
        torch.zeros(8 * BS, 36, dtype=torch.bfloat16),  # token-indexed: view it by page first
        torch.zeros(0, BS, 36, dtype=torch.bfloat16),
    ):
        with pytest.raises(InvalidArgumentError, match=message + r".*dims of size 1 may be left"):
            BlockManager(mla, device_tensors=[good[0], bad])
    with pytest.raises(InvalidArgumentError, match=r"device_tensors\[1\] holds 7 blocks"):
        BlockManager(mla, device_tensors=[good[0], good[1][:7]])
    strided = torch.zeros(BS, 8, 36, dtype=torch.bfloat16).transpose(0, 1)
    with pytest.raises(InvalidArgumentError, match=r"device_tensors\[1\] must be contiguous"):
        BlockManager(mla, device_tensors=[good[0], strided])
    with pytest.raises(InvalidArgumentError, match=r"device_tensors\[1\] shares memory"):
        BlockManager(mla, device_tensors=[good[0], good[0].view(8, 1, BS, 1, 36)])


@pytest.mark.parametrize("device_layout", list(DeviceLayout), ids=lambda d: d.name)
def test_region_view_is_one_layers_k_or_v_of_the_engines_cache(tmp_path, device_layout):
    hnd = KvBlockLayout.OperationalHND
    config = make_config(tmp_path, g2=0, g3=0, device_layout=device_layout, device_format=hnd)
    tensors = engine_cache(config, 8, torch.Generator().manual_seed(12))
    with BlockManager(config, device_tensors=tensors) as manager:
        for layer in range(config.num_layers):
            for outer in range(config.outer_dim):
                view = manager.region_view(layer, outer)
                assert tuple(view.shape) == (8, 2, BS, 16)
                for b in (0, 5):
                    raw = read_raw_block(tensors, config, b)[layer, outer]
                    assert_bits_equal(view[b].cpu(), raw)
        manager.region_view(1, 0)[3] = 7.0  # a view: writes reach the engine's tensors
        block = read_raw_block(tensors, config, 3)
        assert (block[1, 0] == 7.0).all()
        assert (block[1, 1] != 7.0).any() and (block[0, 0] != 7.0).any()
        with pytest.raises(InvalidArgumentError, match="layer"):
            manager.region_view(config.num_layers, 0)
        with pytest.raises(InvalidArgumentError, match="outer"):
            manager.region_view(0, 2)


def test_device_tensors_must_have_the_device_layouts_shapes(tmp_path):
    outer_first = make_config(tmp_path, g2=0, g3=0, device_layout=DeviceLayout.OUTER_FIRST)
    block_first = [torch.zeros(8, 2, BS, 2, 16, dtype=torch.bfloat16) for _ in range(2)]
    with pytest.raises(
        InvalidArgumentError, match=r"device_tensors\[0\] must be \[2, num_blocks, 4, 2, 16\]"
    ):
        BlockManager(outer_first, device_tensors=[t.view(4, 4, BS, 2, 16) for t in block_first])
    strided = [t.transpose(0, 1) for t in block_first]  # the right shape, not in memory order
    with pytest.raises(InvalidArgumentError, match=r"device_tensors\[0\] must be contiguous"):
        BlockManager(outer_first, device_tensors=strided)
    with pytest.raises(InvalidArgumentError, match=r"device_tensors\[1\] holds 7 blocks"):
        BlockManager(outer_first, device_tensors=[strided[0].contiguous(), strided[1][:, :7]])
    with BlockManager(outer_first, device_tensors=[t.contiguous() for t in strided]) as manager:
        assert manager.pool(Tier.G1).num_blocks == 8
    with pytest.raises(InvalidArgumentError, match=r"device_tensors\[1\] shares memory"):
        BlockManager(outer_first, device_tensors=[strided[0].contiguous()] * 2)
    with pytest.raises(InvalidArgumentError, match="device_tensors hold no blocks"):
        BlockManager(outer_first, device_tensors=[t[:, :0] for t in strided])
    contiguous = make_config(tmp_path, g2=0, g3=0, device_layout=DeviceLayout.FULLY_CONTIGUOUS)
    with pytest.raises(InvalidArgumentError, match="one tensor for FULLY_CONTIGUOUS, got 2"):
        BlockManager(contiguous, device_tensors=block_first)
    separate = make_config(tmp_path, g2=0, g3=0, device_layout=DeviceLayout.OUTER_SEPARATE)
    with pytest.raises(
        InvalidArgumentError, match=r"per layer and outer chunk \(4\) for OUTER_SEPARATE, got 2"
    ):
        BlockManager(separate, device_tensors=block_first)
    pool = torch.zeros(8, 2, 2, BS, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(InvalidArgumentError, match="must be a list of one tensor"):
        BlockManager(contiguous, device_tensors=pool)
    with pytest.raises(InvalidArgumentError, match=r"device_tensors\[0\] must be a torch.Tensor"):
        BlockManager(contiguous, device_tensors=[pool.tolist()])


@pytest.mark.gpu
def test_warm_up_leaves_the_engines_cache_as_it_was(tmp_path):
    """On a GPU the manager moves block 0 to G2 and back at construction (compiling both
    directions' kernels); the engine's tensors keep their bytes."""
    config = make_config(tmp_path)
    gen = torch.Generator().manual_seed(3)
    tensors = [
        torch.randn(8, 2, BS, 2, 16, generator=gen).to(torch.bfloat16).cuda() for _ in range(2)
    ]
    before = [t.clone() for t in tensors]
    with BlockManager(config, device_tensors=tensors) as manager:
        torch.cuda.synchronize()
        for t, b in zip(manager.device_tensors, before, strict=True):
            assert torch.equal(t.view(torch.int16), b.view(torch.int16))
        assert manager.pool(Tier.G1).num_available == 8


# Round trips -----------------------------------------------------------------------------------


def test_g1_only_shares_prefixes_and_evicts_lru(tmp_path):
    config = make_config(tmp_path, g1=8, g2=0, g3=0)
    gen = torch.Generator().manual_seed(0)
    with BlockManager(config) as manager:
        assert manager.tiers == [Tier.G1]
        a = tokens_of(1, 3 * BS + 1)
        store(manager, a, gen)
        hit = manager.lookup(a + [5] * BS)
        assert len(hit.block_ids) == 3 and hit.from_tier == {Tier.G1: 3} and hit.misses == 1
        assert hit.num_tokens == 3 * BS
        manager.free(hit.block_ids)
        evict_g1(manager)
        assert manager.lookup(a).block_ids == []
        assert manager.metrics.evictions[Tier.G1] == 3
        check_all_pools(manager)


def test_round_trip_through_g2_and_g3_returns_identical_bytes(tmp_path):
    config = make_config(tmp_path, g1=8, g2=6, g3=64)
    gen = torch.Generator().manual_seed(1)
    with BlockManager(config) as manager:
        sequences = [tokens_of(s, 6 * BS) for s in range(5)]
        expected = {}
        for tokens in sequences:
            expected.update(store(manager, tokens, gen))
        manager.flush()
        assert manager.pool(Tier.G3).num_cached == 30  # every block reached the disk
        for tokens in reversed(sequences):  # the last one is still in G2
            evict_g1(manager)
            hit = manager.lookup(tokens)
            assert len(hit.block_ids) == 6, hit
            assert sum(hit.from_tier.values()) == 6 and hit.from_tier.get(Tier.G1, 0) == 0
            got = block_checksums(manager.layout(Tier.G1), hit.block_ids)
            assert got == [expected[h] for h in hit.hashes]
            manager.free(hit.block_ids)
            check_all_pools(manager)
        assert manager.metrics.hits[Tier.G3] > 0 and manager.metrics.hits[Tier.G2] > 0
        assert manager.metrics.corrupt_blocks == 0


def test_lookup_shares_g1_blocks_and_partial_hits(tmp_path):
    config = make_config(tmp_path, g1=16, g2=16, g3=0)
    gen = torch.Generator().manual_seed(2)
    with BlockManager(config) as manager:
        base = tokens_of(3, 4 * BS)
        store(manager, base, gen)
        manager.flush()  # the offload's hold is gone
        first = manager.lookup(base)
        second = manager.lookup(base[: 2 * BS] + tokens_of(4, 2 * BS))
        assert second.block_ids == first.block_ids[:2]
        assert manager.pool(Tier.G1).refcount(first.block_ids[0]) == 2
        manager.free(first.block_ids)
        manager.free(second.block_ids)
        check_all_pools(manager)


def test_register_validates_before_changing_anything(tmp_path):
    config = make_config(tmp_path, g2=0, g3=0)
    with BlockManager(config) as manager:
        blocks = manager.allocate(2)
        with pytest.raises(InvalidArgumentError, match="token_ids"):
            manager.register(blocks, list(range(BS)))
        with pytest.raises(InvalidArgumentError, match="block_ids"):
            manager.register([blocks[0], blocks[0]], list(range(2 * BS)))
        free_block = next(b for b in range(8) if b not in blocks)
        with pytest.raises(BlockStateError, match=f"block {free_block}"):
            manager.register([blocks[0], free_block], list(range(2 * BS)))
        assert manager.pool(Tier.G1).num_cached == 0
        manager.register(blocks, list(range(2 * BS)))
        with pytest.raises(BlockStateError):
            manager.register(blocks, list(range(2 * BS)))
        with pytest.raises(PoolExhaustedError):
            manager.allocate(7)
        manager.free(blocks)
        check_all_pools(manager)


def test_offload_skips_what_the_lower_tier_has_and_keeps_pools_consistent(tmp_path):
    config = make_config(tmp_path, g1=12, g2=8, g3=16)
    gen = torch.Generator().manual_seed(5)
    with BlockManager(config) as manager:
        rng = random.Random(7)
        prompts = [tokens_of(s, 2 * BS) for s in range(3)]
        for step in range(40):
            tokens = rng.choice(prompts) + tokens_of(100 + step % 9, rng.randrange(0, 3 * BS))
            store(manager, tokens, gen)
            if step % 10 == 9:
                manager.flush()
                check_all_pools(manager)
        manager.flush()
        check_all_pools(manager)
        occupancy = manager.occupancy()
        assert all(o.allocated == 0 for o in occupancy.values())
        assert occupancy[Tier.G2].cached <= 8 and occupancy[Tier.G3].cached <= 16


def test_requests_from_four_threads_each_get_their_own_kv_from_every_tier(tmp_path):
    """Four threads run requests on one manager at once (look up with or without waiting,
    from all tiers or some, compute the rest, register, free), over prompts that share
    prefixes and overflow G1 and G2: every hit holds the KV computed for its hashes, and when
    all is done no block is held and every pool is consistent."""
    config = make_config(tmp_path, g1=40, g2=64, g3=256, onboard_layer_groups=2)
    prompts = [tokens_of(200 + p, 6 * BS) for p in range(12)]
    sources = [None, {Tier.G2}, {Tier.G3, Tier.G4}, ()]
    errors: list[BaseException] = []
    with BlockManager(config) as manager:
        regions = g1_regions(manager)

        def requests(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(16):
                    prompt = rng.choice(prompts)[: BS * rng.randint(1, 6)]
                    prompt = prompt + tokens_of(rng.randrange(10**6), BS * rng.randint(0, 3))
                    wait = rng.random() < 0.5
                    hit = manager.lookup(prompt, wait=wait, onboard_from=rng.choice(sources))
                    hit.ready.synchronize()
                    assert count_mismatches(regions, hit.block_ids, hit.hashes) == 0, hit
                    rest = manager.allocate(len(prompt) // BS - len(hit.block_ids))
                    tokens = prompt[len(hit.block_ids) * BS :]
                    hashes = sequence_hashes(tokens, BS, parent=hit.last_hash)
                    write_pattern(regions, rest, hashes)
                    manager.register(rest, tokens, parent_hash=hit.last_hash)
                    manager.free(hit.block_ids + rest)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=requests, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        manager.flush()
        assert manager.metrics.hits[Tier.G2] > 0 and manager.metrics.hits[Tier.G3] > 0
        assert manager.metrics.corrupt_blocks == 0
        assert all(manager.pool(t).num_in_use == 0 for t in manager.tiers)
        check_all_pools(manager)


# Events ----------------------------------------------------------------------------------------


def test_events_follow_the_blocks(tmp_path):
    publisher, batches = recording_publisher()
    config = make_config(tmp_path, g1=4, g2=8, g3=0)
    gen = torch.Generator().manual_seed(3)
    with BlockManager(config, publisher=publisher) as manager:
        tokens = tokens_of(9, 3 * BS)
        hashes = sequence_hashes(tokens, BS)
        store(manager, tokens, gen)
        manager.flush()
        events = [e for b in batches for e in b.events]
        assert events[0] == BlockStored(tuple(hashes), None, tuple(tokens), BS, Tier.G1)
        assert events[1] == BlockStored(tuple(hashes), None, tuple(tokens), BS, Tier.G2)
        evict_g1(manager)
        manager.flush()
        removed = [e for b in batches for e in b.events if isinstance(e, BlockRemoved)]
        assert removed == [BlockRemoved(tuple(hashes), Tier.G1)]
        more = tokens + tokens_of(10, BS)
        store(manager, more, gen)  # 3 blocks onboarded from G2, one new
        manager.clear()
    events = [e for b in batches for e in b.events]
    onboarded = events[events.index(removed[0]) + 1]
    assert onboarded.tier is Tier.G1 and onboarded.block_hashes == tuple(hashes)
    new = next(e for e in events if isinstance(e, BlockStored) and len(e.block_hashes) == 1)
    assert new.parent_block_hash == hashes[-1] and new.token_ids == tuple(more[3 * BS :])
    assert isinstance(events[-1], AllBlocksCleared)


def test_an_index_forgets_a_closed_worker_and_relearns_its_disk_on_restart(tmp_path):
    """Closing publishes ``AllBlocksCleared`` last (once, however often ``close`` is called), so
    a router's index drops the worker's blocks; the next process announces the G3 blocks it
    reuses, and the index has exactly those."""
    from kvblocks.pool import KvIndex

    index = KvIndex(BS)
    config = make_config(tmp_path, g1=8, g2=4, g3=32)
    gen = torch.Generator().manual_seed(5)
    tokens = tokens_of(13, 5 * BS)
    publisher, batches = recording_publisher()
    publisher.subscribe(lambda batch: index.apply("w", batch))
    manager = BlockManager(config, publisher=publisher)
    store(manager, tokens, gen)
    manager.flush()
    (view,) = index.workers()
    assert view.blocks[Tier.G1] == 5 and view.blocks[Tier.G3] == 5
    manager.close()
    manager.close()
    events = [e for b in batches for e in b.events]
    assert [type(e) for e in events].count(AllBlocksCleared) == 1
    assert isinstance(events[-1], AllBlocksCleared)
    (view,) = index.workers()
    assert sum(view.blocks.values()) == 0 and index.overlaps(tokens)[0].blocks == 0
    with BlockManager(config, publisher=publisher):
        (view,) = index.workers()
        assert {t: n for t, n in view.blocks.items() if n} == {Tier.G3: 5}
        assert index.overlaps(tokens)[0].blocks == 5


def test_wire_form_round_trips():
    from kvblocks.pool import EventBatch

    batch = EventBatch(
        12.5,
        (
            BlockStored((1, 2**64 - 1), None, tuple(range(8)), 4, Tier.G2),
            BlockRemoved((3,), Tier.G3),
            AllBlocksCleared(),
        ),
        data_parallel_rank=2,
    )
    assert EventBatch.from_wire(batch.to_wire()) == batch


# Disk tier: restarts, crashes, corruption ---------------------------------------------------------


def test_g3_survives_a_restart(tmp_path):
    config = make_config(tmp_path, g1=8, g2=4, g3=32)
    gen = torch.Generator().manual_seed(4)
    tokens = tokens_of(11, 5 * BS)
    with BlockManager(config) as manager:
        expected = store(manager, tokens, gen)
        manager.flush()
    publisher, batches = recording_publisher()
    with BlockManager(config, publisher=publisher) as manager:
        assert [e.tier for b in batches for e in b.events] == [Tier.G3]  # announced on start
        assert manager.pool(Tier.G3).num_cached == 5
        hit = manager.lookup(tokens)
        assert hit.from_tier.get(Tier.G3) == 5
        got = block_checksums(manager.layout(Tier.G1), hit.block_ids)
        assert got == [expected[h] for h in hit.hashes]
        manager.free(hit.block_ids)
    other = make_config(tmp_path, g1=8, g2=4, g3=32, head_dim=32)  # another model: a new file
    with BlockManager(other) as manager:
        assert manager.pool(Tier.G3).num_cached == 0


def test_a_g3_file_is_opened_by_one_manager_at_a_time(tmp_path):
    config = make_config(tmp_path, g1=8, g2=4, g3=32)
    gen = torch.Generator().manual_seed(5)
    tokens = tokens_of(12, 3 * BS)
    with BlockManager(config) as first:
        expected = store(first, tokens, gen)
        first.flush()
        with pytest.raises(
            StorageError, match=rf"held by another BlockManager \(process {os.getpid()}\)"
        ):
            BlockManager(config)
        assert first.pool(Tier.G3).num_cached == 3
        store(first, tokens_of(13, 2 * BS), gen)  # first's journal still records
        first.flush()
    with BlockManager(config) as again:  # the lock went with the first manager
        assert again.pool(Tier.G3).num_cached == 5
        evict_g1(again)
        hit = again.lookup(tokens)
        assert block_checksums(again.layout(Tier.G1), hit.block_ids) == [
            expected[h] for h in hit.hashes
        ]
        again.free(hit.block_ids)


def test_a_g3_file_held_by_another_process_is_refused_naming_it(tmp_path):
    config = make_config(tmp_path, g1=8, g2=4, g3=32)
    plain = {k: v for k, v in config.__dict__.items() if isinstance(v, int | float | str)}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys
            from kvblocks.pool import BlockManager, BlockManagerConfig
            manager = BlockManager(BlockManagerConfig(**{plain!r}))
            print("open", flush=True)
            sys.stdin.read()
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "open\n"
        with pytest.raises(StorageError, match=rf"\(process {holder.pid}\).*offload_path"):
            BlockManager(config)
    finally:
        holder.kill()  # killed, not closed: the lock still goes with it
        holder.wait()
    with BlockManager(config) as manager:
        assert manager.pool(Tier.G3).num_blocks == 32


def test_a_g3_file_on_a_filesystem_without_locks_opens_with_a_warning(
    tmp_path, monkeypatch, caplog
):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="kvblocks.pool"):
        with BlockManager(make_config(tmp_path, g1=8, g2=4, g3=32)) as manager:
            assert manager.pool(Tier.G3).num_blocks == 32
    assert "cannot be locked" in caplog.text and "second BlockManager" in caplog.text


def test_a_g3_file_is_reused_only_under_its_disk_cache_key(tmp_path):
    gen = torch.Generator().manual_seed(7)
    tokens = tokens_of(14, 4 * BS)

    def keyed(key):
        return make_config(tmp_path, g1=8, g2=4, g3=32, disk_cache_key=key)

    with BlockManager(keyed("model@1/tp0of2")) as manager:
        expected = store(manager, tokens, gen)
        manager.flush()
    with (
        BlockManager(keyed("model@1/tp1of2")) as rank1,  # same shape, other heads: its own file
        BlockManager(keyed(None)) as unkeyed,
    ):
        assert rank1.pool(Tier.G3).num_cached == unkeyed.pool(Tier.G3).num_cached == 0
        assert rank1.lookup(tokens).block_ids == unkeyed.lookup(tokens).block_ids == []
        store(rank1, tokens, gen)
        rank1.flush()
    with BlockManager(keyed("model@1/tp0of2")) as manager:
        assert manager.pool(Tier.G3).num_cached == 4
        hit = manager.lookup(tokens)
        assert hit.from_tier == {Tier.G1: 0, Tier.G3: 4}
        assert block_checksums(manager.layout(Tier.G1), hit.block_ids) == [
            expected[h] for h in hit.hashes
        ]
        manager.free(hit.block_ids)
    names = sorted(p.name for p in tmp_path.glob("*.bin"))
    assert names[0].startswith("kvblocks-g3-2x2x4x2x16-32") and len(names) == 3
    assert {n.split("-")[2] for n in names[1:]} == {"model_1_tp0of2", "model_1_tp1of2"}


def test_corrupted_disk_block_is_a_miss(tmp_path):
    publisher, batches = recording_publisher()
    config = make_config(tmp_path, g1=8, g2=4, g3=32)
    gen = torch.Generator().manual_seed(6)
    tokens = tokens_of(12, 4 * BS)
    with BlockManager(config, publisher=publisher) as manager:
        expected = store(manager, tokens, gen)
        manager.flush()
        hashes = sequence_hashes(tokens, BS)
        evict_g1(manager)
        filler = [tokens_of(50 + i, 4 * BS) for i in range(2)]  # push the blocks out of G2
        for f in filler:
            store(manager, f, gen)
        manager.flush()
        evict_g1(manager)
        assert all(manager.pool(Tier.G2).lookup(h) is None for h in hashes)
        flip_g3_byte(manager, hashes[2], 100)
        hit = manager.lookup(tokens)
        assert len(hit.block_ids) == 2 and hit.misses == 2
        got = block_checksums(manager.layout(Tier.G1), hit.block_ids)
        assert got == [expected[h] for h in hashes[:2]]
        assert manager.metrics.corrupt_blocks == 1
        assert manager.pool(Tier.G3).lookup(hashes[2]) is None
        assert manager.pool(Tier.G3).lookup(hashes[3]) is not None  # intact, still cached
        manager.free(hit.block_ids)
        check_all_pools(manager)
    removed = [e for b in batches for e in b.events if isinstance(e, BlockRemoved)]
    assert BlockRemoved((hashes[2],), Tier.G3) in removed


CRASHING_OFFLOAD = textwrap.dedent(
    """
    import os, sys, time, torch
    from kvblocks.pool import BlockManager, BlockManagerConfig, sequence_hashes
    from kvblocks.storage import disk

    path, bs = sys.argv[1], 4
    fields = dict(num_layers=2, num_kv_heads=2, head_dim=16, block_size=bs)
    block = BlockManagerConfig(**fields).block_bytes
    config = BlockManagerConfig(**fields, device_blocks=16, enable_offload=True,
                                host_cache_gb=16 * block / 2**30,
                                disk_cache_gb=64 * block / 2**30, offload_path=path)

    def content(h, layer):  # what block h holds in every layer
        n = 2 * bs * 2 * 16
        return ((torch.arange(n) + (h >> layer) % 997) % 251).to(torch.bfloat16)

    def request(manager, tokens):
        blocks = manager.allocate(len(tokens) // bs)
        for l, t in enumerate(manager.device_tensors):
            for b, h in zip(blocks, sequence_hashes(tokens, bs)):
                t[b] = content(h, l).view(t.shape[1:]).to(t.device)
        manager.register(blocks, tokens)
        manager.free(blocks)

    with BlockManager(config) as manager:
        request(manager, list(range(1000, 1000 + 4 * bs)))
        manager.flush()  # 4 blocks fully stored
        write = disk.DiskAllocation._io
        def torn(self, span, is_write):
            offset, addr, size = span
            if is_write:  # write half, then die mid-offload
                write(self, (offset, addr, size // 2), is_write)
                print("MID", flush=True)
                time.sleep(60)
            write(self, span, is_write)
        disk.DiskAllocation._io = torn
        request(manager, list(range(2000, 2000 + 4 * bs)))
        time.sleep(60)
    """
)


def test_killed_offload_leaves_no_incomplete_block_registered(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_OFFLOAD)
    child = subprocess.Popen(  # the environment conftest set up: the interpreter without a GPU
        [sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "MID"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    fields = dict(num_layers=2, num_kv_heads=2, head_dim=16, block_size=BS)
    block = BlockManagerConfig(**fields).block_bytes
    config = BlockManagerConfig(
        **fields,
        device_blocks=16,
        enable_offload=True,
        host_cache_gb=16 * block / 2**30,
        disk_cache_gb=64 * block / 2**30,
        offload_path=str(tmp_path),
    )
    first = sequence_hashes(list(range(1000, 1000 + 4 * BS)), BS)
    torn = sequence_hashes(list(range(2000, 2000 + 4 * BS)), BS)
    with BlockManager(config) as manager:
        g3 = manager.pool(Tier.G3)
        assert [g3.lookup(h) is not None for h in first] == [True] * 4
        assert [g3.lookup(h) for h in torn] == [None] * 4  # the torn write is not registered
        view = manager.layout(Tier.G3).file.view().view(torch.bfloat16)
        layout = manager.layout(Tier.G3).layout
        for h in first:  # and what is registered is whole
            region = layout.block_region(g3.lookup(h))
            stored = view[region.addr // 2 : region.end // 2].view(2, 2, 2, BS, 16)
            for layer in range(2):  # universal format: [nh, nl, no, nt, hd]
                expected = (torch.arange(2 * BS * 2 * 16) + (h >> layer) % 997) % 251
                expected = expected.to(torch.bfloat16).view(2, BS, 2, 16).permute(2, 0, 1, 3)
                assert torch.equal(stored[:, layer], expected)
        hit = manager.lookup(list(range(2000, 2000 + 4 * BS)))
        assert hit.block_ids == [] and hit.misses == 4


def test_failed_offload_is_reported_by_flush(tmp_path, monkeypatch):
    config = make_config(tmp_path, g1=8, g2=8, g3=0)
    gen = torch.Generator().manual_seed(8)
    with BlockManager(config) as manager:

        def broken(*args, **kwargs):
            raise OSError("the copy failed")

        monkeypatch.setattr(manager._transfer, "execute_transfer", broken)
        store(manager, tokens_of(13, 2 * BS), gen)
        with pytest.raises(TransferError, match="the copy failed"):
            manager.flush()
        monkeypatch.undo()
        manager.flush()  # reported once
        check_all_pools(manager)
        assert manager.occupancy()[Tier.G2].cached == 0
        assert manager.occupancy()[Tier.G1].cached == 2  # G1 lost nothing


def test_failed_onboard_leaves_no_block_held(tmp_path, monkeypatch):
    """A lookup whose copy from G2 fails raises, and the G1 hits it had taken are let go
    (the caller got no blocks to free)."""
    config = make_config(tmp_path, g1=8, g2=8, g3=0)
    gen = torch.Generator().manual_seed(9)
    tokens = tokens_of(14, 4 * BS)
    with BlockManager(config) as manager:
        store(manager, tokens, gen)
        manager.flush()
        evict_g1(manager)
        store(manager, tokens[: 2 * BS], gen)  # blocks 0-1 in G1 again, 2-3 only in G2

        def broken(*args, **kwargs):
            raise OSError("the copy failed")

        monkeypatch.setattr(manager._transfer, "execute_layer_groups", broken)
        with pytest.raises(OSError, match="the copy failed"):
            manager.lookup(tokens)
        monkeypatch.undo()
        check_all_pools(manager)
        assert manager.occupancy()[Tier.G1].allocated == 0
        assert manager.occupancy()[Tier.G2].allocated == 0
        hit = manager.lookup(tokens)
        assert hit.from_tier == {Tier.G1: 2, Tier.G2: 2}
        manager.free(hit.block_ids)
