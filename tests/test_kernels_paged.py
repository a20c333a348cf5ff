"""copy_blocks / swap_blocks against their references."""

import pytest
import torch

from kvblocks.errors import (
    BlockIdOutOfRangeError,
    LengthMismatchError,
    OverlapError,
    ShapeMismatchError,
)
from kvblocks.kernels import copy_blocks, swap_blocks
from kvblocks.kernels.paged import copy_blocks_reference, swap_blocks_reference

from .helpers import ALL_DTYPES, assert_bits_equal, gpu_param
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
