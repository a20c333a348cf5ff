"""The torch references against the seed's index formulas, element by element.

Sources are random, destinations poisoned with a NaN bit pattern; every comparison is on the
elements' bits, so fp8 and every float width are checked exactly.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvblocks.errors import (
    InvalidArgumentError,
    LayoutFormatError,
    LengthMismatchError,
    ShapeMismatchError,
    UnsupportedDtypeError,
)
from kvblocks.kernels import reference as ref
from kvblocks.layout import BlockDim, InnerOrder, KvBlockLayout, KvDims

from .helpers import ALL_DTYPES, FLOAT_DTYPES, assert_bits_equal, assert_written, bits, poisoned
from .helpers import random_tensor as rand

ORDERS = list(InnerOrder)


def _grid(dims: KvDims):
    """Index tensors l, o, t, h, d broadcast over the whole block."""
    return torch.meshgrid(
        *(torch.arange(n) for n in (dims.nl, dims.no, dims.nt, dims.nh, dims.hd)), indexing="ij"
    )


def region_index(dims: KvDims, order: InnerOrder, t, h, d):
    if order is InnerOrder.NHD:
        return (t * dims.nh + h) * dims.hd + d
    return (h * dims.nt + t) * dims.hd + d


def operational_index(dims: KvDims, order: InnerOrder):
    l, o, t, h, d = _grid(dims)
    return ((l * dims.no + o) * dims.inner + region_index(dims, order, t, h, d)).flatten()


def universal_index(dims: KvDims):
    l, o, t, h, d = _grid(dims)
    return ((((h * dims.nl + l) * dims.no + o) * dims.nt + t) * dims.hd + d).flatten()


def format_index(dims: KvDims, fmt: KvBlockLayout):
    """Flat index of every element in ``fmt``, from the format's own dim order."""
    l, o, t, h, d = _grid(dims)
    idx = {BlockDim.LAYER: l, BlockDim.OUTER: o, BlockDim.PAGE: t, BlockDim.HEAD: h}
    flat = torch.zeros_like(l)
    for dim in fmt.dim_order:
        flat = flat * dims.size(dim) + idx[dim]
    return (flat * dims.hd + d).flatten()


def assert_moved(src_blocks, dst_blocks, src_index, dst_index):
    """dst[b][dst_index[k]] == src[b][src_index[k]] for every element k of every block b."""
    nb = src_blocks.shape[0]
    s = bits(src_blocks.reshape(nb, -1))[:, src_index]
    d = bits(dst_blocks.reshape(nb, -1))[:, dst_index]
    assert torch.equal(s, d)


def _dims(dtype=torch.bfloat16):
    return KvDims(nl=3, no=2, nh=4, nt=5, hd=8, dtype=dtype)


def _as_regions(stack: torch.Tensor, dims: KvDims, order: InnerOrder):
    """A list of separate region tensors (each its own allocation) from ``[nb, nl*no, inner]``."""
    return [r.clone().view(dims.region_shape(order)) for r in stack.reshape(-1, dims.inner)]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("order", ORDERS)
def test_universal_from_block_formula(dtype, order):
    dims, nb = _dims(dtype), 3
    src = rand((nb, dims.nl * dims.no, dims.inner), dtype)
    dst = poisoned((nb, dims.block_elems), dtype)
    ref.universal_from_block(_as_regions(src, dims, order), dst, dims, order)
    assert_written(dst)
    assert_moved(src, dst, operational_index(dims, order), universal_index(dims))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("order", ORDERS)
def test_block_from_universal_formula(dtype, order):
    dims, nb = _dims(dtype), 2
    src = rand((nb, dims.block_elems), dtype)
    regions = [poisoned(dims.region_shape(order), dtype) for _ in range(nb * dims.nl * dims.no)]
    ref.block_from_universal(src, regions, dims, order)
    for r in regions:
        assert_written(r)
    dst = torch.stack(regions).view(nb, -1)
    assert_moved(src, dst, universal_index(dims), operational_index(dims, order))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("order", ORDERS)
def test_operational_universal_formulas(dtype, order):
    dims, nb = _dims(dtype), 4
    op = rand((nb, dims.nl, dims.no, dims.inner), dtype)
    uni = poisoned((nb, *dims.block_shape(KvBlockLayout.UniversalTP)), dtype)
    ref.universal_from_operational(op, uni, dims, order)
    assert_written(uni)
    assert_moved(op, uni, operational_index(dims, order), universal_index(dims))

    back = poisoned(op.shape, dtype)
    ref.operational_from_universal(uni, back, dims, order)
    assert_written(back)
    assert_bits_equal(back, op)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("block_order", ORDERS)
@pytest.mark.parametrize("op_order", ORDERS)
def test_block_operational_formulas(dtype, block_order, op_order):
    dims, nb = _dims(dtype), 2
    src = rand((nb, dims.nl * dims.no, dims.inner), dtype)
    op = poisoned((nb, dims.block_elems), dtype)
    ref.operational_from_block(_as_regions(src, dims, block_order), op, dims, block_order, op_order)
    assert_written(op)
    assert_moved(src, op, operational_index(dims, block_order), operational_index(dims, op_order))
    if block_order is op_order:  # a flat copy
        assert_bits_equal(op, src.reshape(nb, -1))

    regions = [poisoned(dims.region_shape(block_order), dtype) for _ in range(nb * 6)]
    ref.block_from_operational(op, regions, dims, op_order, block_order)
    assert_bits_equal(torch.stack(regions).view(src.shape), src)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("order", ORDERS)
def test_block_universal_round_trip(dtype, order):
    dims, nb = _dims(dtype), 5
    regions = _as_regions(rand((nb, 6, dims.inner), dtype), dims, order)
    uni = poisoned((nb, dims.block_elems), dtype)
    ref.universal_from_block(regions, uni, dims, order)
    back = [poisoned(r.shape, dtype) for r in regions]
    ref.block_from_universal(uni, back, dims, order)
    for a, b in zip(back, regions, strict=True):
        assert_bits_equal(a, b)


DIMS = st.builds(
    KvDims,
    nl=st.integers(1, 4),
    no=st.integers(1, 2),
    nh=st.integers(1, 4),
    nt=st.integers(1, 5),
    hd=st.integers(1, 6),
    dtype=st.sampled_from(ALL_DTYPES),
)
FORMATS = st.one_of(
    st.sampled_from(
        [
            KvBlockLayout.OperationalNHD,
            KvBlockLayout.OperationalHND,
            KvBlockLayout.UniversalTP,
            KvBlockLayout.UniversalPP,
        ]
    ),
    st.permutations(list(BlockDim)).map(KvBlockLayout.Custom),
)


@given(dims=DIMS, nb=st.integers(1, 3), src_fmt=FORMATS, dst_fmt=FORMATS)
def test_convert_any_formats(dims, nb, src_fmt, dst_fmt):
    src = rand((nb, dims.block_elems), dims.dtype)
    dst = poisoned((nb, dims.block_elems), dims.dtype)
    ref.convert(src, dst, dims, src_fmt, dst_fmt)
    assert_written(dst)
    assert_moved(src, dst, format_index(dims, src_fmt), format_index(dims, dst_fmt))
    back = poisoned(src.shape, dims.dtype)
    ref.convert([b for b in dst], back, dims, dst_fmt, src_fmt)
    assert_bits_equal(back, src)


@given(dims=DIMS, nb=st.integers(1, 3), order=st.sampled_from(ORDERS))
def test_block_stack_round_trips_random_dims(dims, nb, order):
    src = rand((nb, dims.nl * dims.no, dims.inner), dims.dtype)
    uni = poisoned((nb, dims.block_elems), dims.dtype)
    ref.universal_from_block(_as_regions(src, dims, order), uni, dims, order)
    assert_moved(src, uni, operational_index(dims, order), universal_index(dims))
    out = [poisoned(dims.region_shape(order), dims.dtype) for _ in range(nb * dims.nl * dims.no)]
    ref.block_from_universal(uni, out, dims, order)
    assert_bits_equal(torch.stack(out).view(src.shape), src)


def test_in_place_conversion_is_safe():
    dims = _dims(torch.float32)
    x = rand((2, dims.block_elems), torch.float32)
    expected = poisoned(x.shape, torch.float32)
    ref.universal_from_operational(x, expected, dims, InnerOrder.NHD)
    ref.universal_from_operational(x, x, dims, InnerOrder.NHD)
    assert_bits_equal(x, expected)


def test_errors_name_the_argument():
    dims = _dims()
    nhd = InnerOrder.NHD
    good = rand((2, dims.block_elems), torch.bfloat16)
    regions = _as_regions(rand((2, 6, dims.inner), torch.bfloat16), dims, nhd)
    out = poisoned((2, dims.block_elems), torch.bfloat16)

    with pytest.raises(LengthMismatchError, match="src must hold a positive multiple of 6"):
        ref.universal_from_block(regions[:5], out, dims, nhd)
    with pytest.raises(LengthMismatchError, match="src must hold a positive multiple"):
        ref.universal_from_block([], out, dims, nhd)
    with pytest.raises(ShapeMismatchError, match=r"src\[3\] has 10 elements"):
        bad = list(regions)
        bad[3] = rand((10,), torch.bfloat16)
        ref.universal_from_block(bad, out, dims, nhd)
    with pytest.raises(UnsupportedDtypeError, match=r"src\[0\] has dtype torch.float32"):
        ref.universal_from_block([r.float() for r in regions], out, dims, nhd)
    with pytest.raises(UnsupportedDtypeError, match="dst has dtype torch.float16"):
        ref.universal_from_operational(good, out.half(), dims, nhd)
    with pytest.raises(ShapeMismatchError, match="dst has"):
        ref.universal_from_operational(good, out[:1], dims, nhd)
    with pytest.raises(LengthMismatchError, match="dst must hold 12 tensors"):
        ref.block_from_universal(good, regions[:6], dims, nhd)
    with pytest.raises(ShapeMismatchError, match="src has 7 elements"):
        ref.universal_from_operational(rand((7,), torch.bfloat16), out, dims, nhd)
    with pytest.raises(InvalidArgumentError, match=r"src\[0\] must be a torch.Tensor"):
        ref.universal_from_block([1.0] * 6, out, dims, nhd)
    with pytest.raises(LayoutFormatError, match="fmt must state its dimension order"):
        ref.convert(good, out, dims, KvBlockLayout.Unknown, KvBlockLayout.UniversalTP)


def test_no_write_on_invalid_call():
    dims = _dims()
    out = poisoned((2, dims.block_elems), torch.bfloat16)
    regions = _as_regions(rand((2, 6, dims.inner), torch.bfloat16), dims, InnerOrder.NHD)
    regions[-1] = regions[-1].float()
    with pytest.raises(UnsupportedDtypeError):
        ref.universal_from_block(regions, out, dims, InnerOrder.NHD)
    assert bits(out).eq(-1).all()


@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=6).flatmap(
        lambda shape: st.tuples(st.just(shape), st.permutations(range(len(shape))))
    )
)
def test_merged_axes_permute_the_same_elements(case):
    shape, perm = case
    x = torch.randperm(torch.Size(shape).numel()).view(shape)
    merged, merged_perm = ref.merge_axes(shape, perm)
    assert len(merged) == len(merged_perm) <= len(shape)
    assert torch.Size(merged).numel() == x.numel()
    assert torch.equal(x.reshape(merged).permute(merged_perm).flatten(), x.permute(perm).flatten())


def test_merged_axes_of_block_stack_to_universal():
    # [nb, nl, no, nt, nh, hd] -> [nb, nh, nl, no, nt, hd] is one transpose of two axes.
    assert ref.merge_axes([3, 4, 2, 16, 8, 64], [0, 4, 1, 2, 3, 5]) == (
        [3, 128, 8, 64],
        [0, 2, 1, 3],
    )
