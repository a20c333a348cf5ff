"""copy_blocks / copy_single_block / swap_blocks against their references."""

from dataclasses import replace

import pytest
import torch

from kvblocks.errors import (
    BlockIdOutOfRangeError,
    InvalidArgumentError,
    LengthMismatchError,
    OverlapError,
    ShapeMismatchError,
)
from kvblocks.kernels import Backend, copy_blocks, copy_single_block, pinned_programs, swap_blocks
from kvblocks.kernels.paged import copy_blocks_reference, plan_paged, swap_blocks_reference

from .helpers import ALL_DTYPES, assert_bits_equal, gpu_param, kernel_compiles, poisoned
from .helpers import random_tensor as rand

DEVICES = [pytest.param("cpu", id="cpu"), gpu_param("cuda")]


def _caches(num_layers, num_blocks, shape, dtype, device):
    make = lambda: rand((num_blocks, *shape), dtype, device)  # noqa: E731
    return [make() for _ in range(num_layers)], [make() for _ in range(num_layers)]


def _mapping(num_pairs, num_blocks, swap):
    ids = torch.randperm(num_blocks)[: 2 * num_pairs]
    return ids.view(num_pairs, 2) if swap else torch.stack([ids[:num_pairs], ids[num_pairs:]], 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize(
    "op,ref", [(copy_blocks, copy_blocks_reference), (swap_blocks, swap_blocks_reference)]
)
@pytest.mark.parametrize("shape", [(16, 2, 8), (3, 1, 5)])
def test_matches_reference(op, ref, dtype, device, shape):
    keys, values = _caches(3, 12, shape, dtype, device)
    expected = [c.clone().cpu() for c in keys + values]
    mapping = _mapping(5, 12, swap=op is swap_blocks)
    op(keys, values, mapping)
    ref(expected, mapping)
    for got, want in zip(keys + values, expected, strict=True):
        assert_bits_equal(got.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_many_pairs_and_mla_caches(device):
    keys, _ = _caches(2, 300, (4, 1, 32), torch.bfloat16, device)
    expected = [c.clone().cpu() for c in keys]
    mapping = _mapping(128, 300, swap=False).tolist()
    copy_blocks(keys, [], mapping)
    copy_blocks_reference(expected, torch.tensor(mapping))
    for got, want in zip(keys, expected, strict=True):
        assert_bits_equal(got.cpu(), want)


def test_swap_twice_restores():
    keys, values = _caches(2, 8, (4, 2, 4), torch.float32, "cpu")
    before = [c.clone() for c in keys + values]
    mapping = torch.tensor([[0, 5], [2, 7]])
    swap_blocks(keys, values, mapping)
    assert not torch.equal(keys[0][0], before[0][0])
    swap_blocks(keys, values, mapping)
    for got, want in zip(keys + values, before, strict=True):
        assert_bits_equal(got, want)


def test_rejections_write_nothing():
    keys, values = _caches(2, 8, (4, 2, 4), torch.float32, "cpu")
    before = [c.clone() for c in keys + values]
    cases = [
        (swap_blocks, [[0, 1], [1, 2]], OverlapError, "names block 1 twice"),
        (swap_blocks, [[3, 3]], OverlapError, "names block 3 twice"),
        (copy_blocks, [[0, 1], [2, 1]], OverlapError, "writes block 1 twice"),
        (copy_blocks, [[0, 1], [1, 2]], OverlapError, "block 1 as both a source and a dest"),
        (
            copy_blocks,
            [[0, 8]],
            BlockIdOutOfRangeError,
            r"block_mapping\[0, 1\] must be in \[0, 8\)",
        ),
        (copy_blocks, [[-1, 2]], BlockIdOutOfRangeError, r"block_mapping\[0, 0\]"),
        (copy_blocks, [[0, 1, 2]], ShapeMismatchError, r"must be \[num_pairs, 2\]"),
    ]
    for op, mapping, error, match in cases:
        with pytest.raises(error, match=match):
            op(keys, values, mapping)
    with pytest.raises(LengthMismatchError, match="value_caches must hold 2 tensors"):
        copy_blocks(keys, values[:1], [[0, 1]])
    with pytest.raises(ShapeMismatchError, match=r"value_caches\[1\] is torch.float64"):
        copy_blocks(keys, [values[0], values[1].double()], [[0, 1]])
    with pytest.raises(ShapeMismatchError, match="must be contiguous"):
        copy_blocks([keys[0].transpose(1, 2)], [], [[0, 1]])
    with pytest.raises(LengthMismatchError, match="key_caches must hold at least one"):
        copy_blocks([], [], [[0, 1]])
    for got, want in zip(keys + values, before, strict=True):
        assert torch.equal(got, want)
    copy_blocks(keys, values, torch.empty(0, 2, dtype=torch.long))  # nothing to do


def _poisoned_caches(num_layers, num_blocks, shape, dtype, device, pin=False):
    make = lambda: poisoned((num_blocks, *shape), dtype, device)  # noqa: E731
    caches = [make() for _ in range(2 * num_layers)]
    if pin:
        caches = [c.pin_memory() for c in caches]
    return caches[:num_layers], caches[num_layers:]


# Source and destination caches: both on the device, or one of them in pinned host memory.
PLACES = [
    pytest.param("cpu", "cpu", id="cpu"),
    gpu_param("cuda", "cuda"),
    gpu_param("cuda", "pinned"),
    gpu_param("pinned", "cuda"),
]


def _place(caches, where):
    return [c.pin_memory() for c in caches] if where == "pinned" else caches


@pytest.mark.parametrize("src_where,dst_where", PLACES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(16, 2, 8), (3, 1, 5)])
def test_copy_into_other_caches(src_where, dst_where, dtype, shape):
    """Blocks of 12-block caches into poisoned 7-block caches: every named destination block
    becomes its source, every other destination block keeps its poison, sources are unchanged.
    Block 2 is both a source and (in the other caches) a destination."""
    src_device = "cuda" if src_where == "cuda" else "cpu"
    dst_device = "cuda" if dst_where == "cuda" else "cpu"
    keys, values = _caches(3, 12, shape, dtype, src_device)
    keys, values = _place(keys, src_where), _place(values, src_where)
    dst_keys, dst_values = _poisoned_caches(3, 7, shape, dtype, dst_device, dst_where == "pinned")
    before = [c.clone().cpu() for c in keys + values]
    expected = [c.clone().cpu() for c in dst_keys + dst_values]
    mapping = torch.tensor([[11, 0], [2, 6], [5, 2], [0, 4]])
    copy_blocks(keys, values, mapping, dst_keys, dst_values)
    copy_blocks_reference(before, mapping, expected)
    if src_where == "cuda" or dst_where == "cuda":
        torch.cuda.synchronize()
    for got, want in zip(dst_keys + dst_values, expected, strict=True):
        assert_bits_equal(got.cpu(), want)
    for got, want in zip(keys + values, before, strict=True):
        assert_bits_equal(got.cpu(), want)


@pytest.mark.parametrize("src_where,dst_where", PLACES)
def test_grid_follows_pinned_memory(src_where, dst_where):
    """On a GPU the kernel runs on few programs where a side is pinned host memory, on a
    program per tile in device memory."""
    src_device = "cuda" if src_where == "cuda" else "cpu"
    keys, values = _caches(2, 12, (16, 2, 8), torch.bfloat16, src_device)
    keys, values = _place(keys, src_where), _place(values, src_where)
    dst_keys, dst_values = _poisoned_caches(
        2,
        7,
        (16, 2, 8),
        torch.bfloat16,
        "cuda" if dst_where == "cuda" else "cpu",
        dst_where == "pinned",
    )
    plan = plan_paged(keys, values, [[3, 1]], dst_key_caches=dst_keys, dst_value_caches=dst_values)
    on_gpu = "cuda" in (src_where, dst_where)
    pinned = pinned_programs(src_where == "pinned", dst_where == "pinned", plan.step_bytes)
    assert plan.programs == (pinned if on_gpu else None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("swap", [False, True], ids=["copy", "swap"])
@pytest.mark.parametrize("programs", [1, 3, 1000])
def test_capped_grid(device, swap, programs):
    """Fewer programs than tiles (here two per block): each program moves every
    ``programs``-th tile, and every block still lands."""
    keys, values = _caches(2, 12, (16, 2, 128), torch.float32, device)  # 16 KiB blocks
    expected = [c.clone().cpu() for c in keys + values]
    mapping = _mapping(4, 12, swap)
    plan = replace(plan_paged(keys, values, mapping, swap=swap), programs=programs)
    if plan.backend is not Backend.REFERENCE:
        assert plan.num_programs == min(programs, 4 * 4 * 2)  # pairs * caches * tiles
    plan.run()
    (swap_blocks_reference if swap else copy_blocks_reference)(expected, mapping)
    for got, want in zip(keys + values, expected, strict=True):
        assert_bits_equal(got.cpu(), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("swap", [False, True], ids=["copy", "swap"])
def test_new_mapping_lengths_compile_nothing(swap):
    """After one call, calls with other numbers of pairs reuse the compiled kernel."""
    keys, values = _caches(2, 80, (16, 2, 8), torch.float16, "cuda")
    op, ref = (swap_blocks, swap_blocks_reference) if swap else (copy_blocks, copy_blocks_reference)
    op(keys, values, _mapping(1, 80, swap))
    with kernel_compiles() as compiled:
        for pairs in (2, 3, 16, 17, 32, 40):
            expected = [c.clone().cpu() for c in keys + values]
            mapping = _mapping(pairs, 80, swap)
            op(keys, values, mapping)
            ref(expected, mapping)
            for got, want in zip(keys + values, expected, strict=True):
                assert_bits_equal(got.cpu(), want)
    assert compiled == []


@pytest.mark.parametrize("device", DEVICES)
def test_copy_single_block(device):
    """One layer as tensors (the seed's form), then several layers with no value caches."""
    (key,), (value,) = _caches(1, 5, (4, 2, 8), torch.bfloat16, device)
    (dst_key,), (dst_value,) = _poisoned_caches(1, 3, (4, 2, 8), torch.bfloat16, device)
    copy_single_block(key, value, dst_key, dst_value, 4, 1)
    assert_bits_equal(dst_key[1].cpu(), key[4].cpu())
    assert_bits_equal(dst_value[1].cpu(), value[4].cpu())
    for poisoned_block in (dst_key[0], dst_key[2], dst_value[0], dst_value[2]):
        assert_bits_equal(poisoned_block.cpu(), poisoned((4, 2, 8), torch.bfloat16))
    keys, _ = _caches(3, 5, (4, 2, 8), torch.float16, device)
    expected = [k.clone().cpu() for k in keys]
    copy_single_block(keys, None, keys, None, 0, 3)
    copy_blocks_reference(expected, torch.tensor([[0, 3]]))
    for got, want in zip(keys, expected, strict=True):
        assert_bits_equal(got.cpu(), want)


def test_copy_into_the_same_memory_follows_the_in_place_rules():
    """Destination caches that are the sources (other tensor objects over the same memory)."""
    keys, values = _caches(2, 8, (4, 2, 4), torch.float32, "cpu")
    same_keys, same_values = [k.view_as(k) for k in keys], [v.view_as(v) for v in values]
    expected = [c.clone() for c in keys + values]
    copy_blocks(keys, values, [[1, 6]], same_keys, same_values)
    copy_blocks_reference(expected, torch.tensor([[1, 6]]))
    for got, want in zip(keys + values, expected, strict=True):
        assert_bits_equal(got, want)
    with pytest.raises(OverlapError, match="block 6 as both a source and a dest"):
        copy_blocks(keys, values, [[1, 6], [6, 2]], same_keys, same_values)
    with pytest.raises(OverlapError, match="as both a source and a dest"):
        copy_single_block(keys[0], values[0], keys[0], values[0], 3, 3)


def test_copy_into_other_caches_rejections_write_nothing():
    keys, values = _caches(2, 8, (4, 2, 4), torch.float32, "cpu")
    dst_keys, dst_values = _poisoned_caches(2, 5, (4, 2, 4), torch.float32, "cpu")
    before = [c.clone() for c in keys + values + dst_keys + dst_values]
    overlapping = [keys[0][3:], dst_keys[1]]
    cases = [
        ([[0, 5]], (dst_keys, dst_values), BlockIdOutOfRangeError, r"\[0, 1\] must be in \[0, 5\)"),
        ([[0, 1], [2, 1]], (dst_keys, dst_values), OverlapError, "writes block 1 twice"),
        ([[0, 1]], (dst_keys, []), LengthMismatchError, "must hold 4 tensors in all, got 2"),
        (
            [[0, 1]],
            (
                [k[:, :2].contiguous() for k in dst_keys],
                [v[:, :2].contiguous() for v in dst_values],
            ),
            ShapeMismatchError,
            r"dst_key_caches\[0\] holds torch.float32 blocks of \[2, 2, 4\]",
        ),
        (
            [[0, 1]],
            ([k.double() for k in dst_keys], [v.double() for v in dst_values]),
            ShapeMismatchError,
            "holds torch.float64 blocks",
        ),
        ([[0, 1]], (overlapping, dst_values), OverlapError, "overlaps key_caches"),
    ]
    for mapping, (dk, dv), error, match in cases:
        with pytest.raises(error, match=match):
            copy_blocks(keys, values, mapping, dk, dv)
    with pytest.raises(InvalidArgumentError, match="swaps are in place"):
        plan_paged(keys, values, [[0, 1]], swap=True, dst_key_caches=dst_keys)
    for got, want in zip(keys + values + dst_keys + dst_values, before, strict=True):
        assert_bits_equal(got, want)


def test_a_cache_named_twice_is_rejected():
    """Swapping (or copying) a cache given twice would do it twice, racing."""
    keys, values = _caches(2, 8, (4, 2, 4), torch.float32, "cpu")
    before = [c.clone() for c in keys + values]
    with pytest.raises(OverlapError, match=r"value_caches\[0\] overlaps key_caches\[0\]"):
        swap_blocks(keys, [keys[0], values[1]], [[0, 1]])
    for got, want in zip(keys + values, before, strict=True):
        assert_bits_equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pageable_host_caches_are_rejected_on_a_gpu():
    keys, values = _caches(1, 4, (4, 2, 4), torch.float32, "cuda")
    host_keys, host_values = _caches(1, 4, (4, 2, 4), torch.float32, "cpu")
    with pytest.raises(InvalidArgumentError, match=r"dst_key_caches\[0\] is in pageable host"):
        copy_blocks(keys, values, [[0, 1]], host_keys, host_values)
