"""Tensor-parallel resharding of universal blocks."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvblocks.errors import InvalidArgumentError, LengthMismatchError, ShapeMismatchError
from kvblocks.kernels import join_heads, reshard_universal, split_heads
from kvblocks.layout import KvDims

from .helpers import FLOAT_DTYPES, assert_bits_equal
from .helpers import random_tensor as rand


def _full(dims: KvDims, nb: int) -> torch.Tensor:
    return rand((nb, dims.nh, dims.nl, dims.no, dims.nt, dims.hd), dims.dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("tp_to", [8, 2, 1, 4])
def test_tp4_to_other_degrees(dtype, tp_to):
    dims = KvDims(nl=3, no=2, nh=8, nt=4, hd=16, dtype=dtype)
    full = _full(dims, nb=5)
    saved = split_heads(full, dims, 4)
    assert [s.shape[1] for s in saved] == [2] * 4
    out = reshard_universal(saved, dims, tp_to)
    heads = 8 // tp_to
    assert len(out) == tp_to
    for rank, shard in enumerate(out):
        assert shard.is_contiguous()
        assert shard.shape == (5, heads, 3, 2, 4, 16)
        assert_bits_equal(shard, full[:, rank * heads : (rank + 1) * heads])
    assert_bits_equal(join_heads(out, dims), full)


@given(
    heads=st.sampled_from([1, 2, 4, 8, 12, 16]),
    data=st.data(),
    nb=st.integers(1, 3),
)
def test_reshard_any_divisors(heads, data, nb):
    divisors = [d for d in range(1, heads + 1) if heads % d == 0]
    tp_from = data.draw(st.sampled_from(divisors))
    tp_to = data.draw(st.sampled_from(divisors))
    dims = KvDims(nl=2, no=2, nh=heads, nt=3, hd=4, dtype=torch.float16)
    full = _full(dims, nb)
    shards = [s.clone() for s in split_heads(full, dims, tp_from)]
    out = reshard_universal(shards, dims, tp_to)
    assert_bits_equal(torch.cat(out, dim=1), full)
    back = reshard_universal(out, dims, tp_from)
    for a, b in zip(back, shards, strict=True):
        assert_bits_equal(a, b)


def test_output_does_not_alias_input():
    dims = KvDims(nl=1, no=2, nh=4, nt=2, hd=4, dtype=torch.float32)
    shards = split_heads(_full(dims, 2), dims, 2)
    out = reshard_universal(shards, dims, 2)
    out[0].zero_()
    assert shards[0].abs().sum() > 0


def test_reshard_errors():
    dims = KvDims(nl=2, no=2, nh=8, nt=4, hd=4, dtype=torch.bfloat16)
    shards = split_heads(_full(dims, 2), dims, 4)
    with pytest.raises(
        InvalidArgumentError, match="tp_to must divide the 8 KV heads evenly, got 3"
    ):
        reshard_universal(shards, dims, 3)
    with pytest.raises(InvalidArgumentError, match="tp_to must be a positive int"):
        reshard_universal(shards, dims, 0)
    with pytest.raises(InvalidArgumentError, match=r"len\(shards\) must divide"):
        reshard_universal(shards[:3], dims, 2)
    with pytest.raises(LengthMismatchError, match="shards must hold one tensor per source rank"):
        reshard_universal([], dims, 2)
    with pytest.raises(ShapeMismatchError, match=r"shards\[1\] holds 1 blocks, shards\[0\] 2"):
        reshard_universal([shards[0], shards[1][:1], shards[2], shards[3]], dims, 2)
    with pytest.raises(ShapeMismatchError, match=r"shards\[2\] has dtype torch.float32"):
        reshard_universal([shards[0], shards[1], shards[2].float(), shards[3]], dims, 2)
    with pytest.raises(ShapeMismatchError, match=r"shards\[0\] has 5 elements"):
        reshard_universal([torch.zeros(5, dtype=torch.bfloat16)] + shards[1:], dims, 2)
