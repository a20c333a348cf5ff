"""KvDims, dtypes, block formats and LayoutConfig: derived sizes and validation."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvblocks.errors import (
    InvalidArgumentError,
    KvBlocksError,
    LayoutFormatError,
    ShapeMismatchError,
    UnsupportedDtypeError,
)
from kvblocks.layout import (
    NAMED_FORMATS,
    BlockDim,
    InnerOrder,
    KvBlockLayout,
    KvDims,
    LayoutConfig,
    dtype_name,
    parse_dtype,
)

from .helpers import ALL_DTYPES

L, O, P, H = BlockDim.LAYER, BlockDim.OUTER, BlockDim.PAGE, BlockDim.HEAD


def test_llama_70b_block_bytes():
    d16 = KvDims(nl=80, no=2, nh=8, nt=16, hd=128, dtype="bf16")
    d64 = KvDims(nl=80, no=2, nh=8, nt=64, hd=128, dtype=torch.bfloat16)
    assert d16.inner == 16 * 8 * 128
    assert d16.region_bytes == 32 * 1024
    assert d16.block_bytes == 5 * 2**20
    assert d64.block_bytes == 20 * 2**20
    assert d16.token_bytes == d64.token_bytes == 80 * 2 * 8 * 128 * 2


@given(
    nl=st.integers(1, 200),
    no=st.integers(1, 2),
    nh=st.integers(1, 64),
    nt=st.integers(1, 512),
    hd=st.integers(1, 512),
    dtype=st.sampled_from(ALL_DTYPES),
)
def test_derived_sizes(nl, no, nh, nt, hd, dtype):
    d = KvDims(nl, no, nh, nt, hd, dtype)
    assert d.itemsize == dtype.itemsize
    assert d.block_elems == nl * no * nt * nh * hd
    assert d.block_bytes == d.block_elems * dtype.itemsize == nl * no * d.region_bytes
    for fmt in NAMED_FORMATS:
        if fmt.dim_order is not None:
            shape = d.block_shape(fmt)
            assert shape[-1] == hd
            assert torch.Size(shape).numel() == d.block_elems


@pytest.mark.parametrize("name", ["nl", "no", "nh", "nt", "hd"])
@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "4", None])
def test_dims_reject_non_positive_ints(name, bad):
    kwargs = dict(nl=2, no=2, nh=2, nt=4, hd=8)
    kwargs[name] = bad
    with pytest.raises(InvalidArgumentError) as exc:
        KvDims(**kwargs)
    assert exc.value.argument == name
    assert str(exc.value).startswith(f"{name} must be a positive int")


@pytest.mark.parametrize("bad", [torch.int32, torch.complex64, torch.bool, "int8", "f128", 3])
def test_dims_reject_unsupported_dtype(bad):
    with pytest.raises(UnsupportedDtypeError, match="dtype must be one of") as exc:
        KvDims(nl=1, no=2, nh=1, nt=1, hd=1, dtype=bad)
    assert isinstance(exc.value, KvBlocksError) and isinstance(exc.value, TypeError)


@pytest.mark.parametrize(
    "text,dtype",
    [
        ("bf16", torch.bfloat16),
        ("BFloat16", torch.bfloat16),
        ("torch.float16", torch.float16),
        ("half", torch.float16),
        ("float", torch.float32),
        ("double", torch.float64),
        ("fp8_e4m3", torch.float8_e4m3fn),
        ("float8_e5m2", torch.float8_e5m2),
    ],
)
def test_parse_dtype_names(text, dtype):
    assert parse_dtype(text) is dtype
    assert parse_dtype(dtype_name(dtype)) is dtype


def test_named_formats_state_their_orders():
    assert KvBlockLayout.OperationalNHD.dim_order == (L, O, P, H)
    assert KvBlockLayout.OperationalHND.dim_order == (L, O, H, P)
    assert KvBlockLayout.UniversalTP.dim_order == (H, L, O, P)
    assert KvBlockLayout.UniversalPP.dim_order == (L, H, O, P)
    assert KvBlockLayout.Unknown.dim_order is None
    assert str(KvBlockLayout.UniversalTP) == "universal_tp [nh, nl, no, nt, hd]"
    d = KvDims(nl=3, no=2, nh=5, nt=7, hd=11)
    assert d.block_shape(KvBlockLayout.OperationalNHD) == (3, 2, 7, 5, 11)
    assert d.block_shape(KvBlockLayout.OperationalHND) == (3, 2, 5, 7, 11)
    assert d.block_shape(KvBlockLayout.UniversalTP) == (5, 3, 2, 7, 11)
    assert d.block_shape(KvBlockLayout.UniversalPP) == (3, 5, 2, 7, 11)
    assert d.block_shape(KvBlockLayout.Custom([P, H, L, O])) == (7, 5, 3, 2, 11)
    assert d.region_shape(InnerOrder.NHD) == (7, 5, 11)
    assert d.region_shape(InnerOrder.HND) == (5, 7, 11)
    with pytest.raises(LayoutFormatError):
        d.block_shape(KvBlockLayout.Unknown)


def test_format_predicates():
    op = [KvBlockLayout.OperationalNHD, KvBlockLayout.OperationalHND]
    uni = [KvBlockLayout.UniversalTP, KvBlockLayout.UniversalPP]
    for f in op:
        assert f.is_operational() and not f.is_universal()
    for f in uni:
        assert f.is_universal() and not f.is_operational()
    for f in (KvBlockLayout.Unknown, KvBlockLayout.Custom([H, P, L, O])):
        assert not f.is_operational() and not f.is_universal()
    assert KvBlockLayout.OperationalNHD.inner_order is InnerOrder.NHD
    assert KvBlockLayout.OperationalHND.inner_order is InnerOrder.HND
    assert KvBlockLayout.UniversalTP.inner_order is None
    assert InnerOrder.NHD.operational == KvBlockLayout.OperationalNHD
    assert InnerOrder.HND.operational == KvBlockLayout.OperationalHND
    assert (InnerOrder.NHD.value, InnerOrder.HND.value) == (0, 1)


def test_requires_transform():
    known = [f for f in NAMED_FORMATS if f.dim_order is not None]
    for a in known:
        for b in known:
            assert a.requires_transform(b) == (a != b)
        assert a.requires_transform(KvBlockLayout.Unknown)
        assert KvBlockLayout.Unknown.requires_transform(a)
    assert not KvBlockLayout.Unknown.requires_transform(KvBlockLayout.Unknown)
    same_as_nhd = KvBlockLayout.Custom([L, O, P, H])
    assert not same_as_nhd.requires_transform(KvBlockLayout.OperationalNHD)
    assert KvBlockLayout.Custom([O, L, P, H]).requires_transform(KvBlockLayout.OperationalNHD)


@pytest.mark.parametrize("order", [[L, O, P], [L, O, P, P], [L, O, P, "nh"], [L, O, P, H, L]])
def test_custom_rejects_non_permutations(order):
    with pytest.raises(LayoutFormatError, match="order must be a permutation"):
        KvBlockLayout.Custom(order)


def test_from_name_round_trips():
    for f in NAMED_FORMATS:
        assert KvBlockLayout.from_name(f.name) == f
    with pytest.raises(LayoutFormatError, match="name must be one of"):
        KvBlockLayout.from_name("nhd")


def _config(**over):
    kw = dict(
        num_blocks=4,
        num_layers=3,
        outer_dim=2,
        page_size=16,
        inner_dim=256,
        dtype_width_bytes=2,
        num_heads=2,
    )
    kw.update(over)
    return LayoutConfig(**kw)


def test_config_sizes_and_dims():
    cfg = _config()
    assert cfg.region_bytes == 16 * 256 * 2
    assert cfg.block_bytes == 3 * 2 * cfg.region_bytes
    assert cfg.total_bytes == 4 * cfg.block_bytes
    dims = cfg.dims("bf16")
    assert (dims.nl, dims.no, dims.nh, dims.nt, dims.hd) == (3, 2, 2, 16, 128)
    assert dims.region_bytes == cfg.region_bytes
    assert LayoutConfig.from_dims(dims, 4) == cfg


@pytest.mark.parametrize(
    "field,bad,match",
    [
        ("num_blocks", 0, "num_blocks must be a positive int"),
        ("num_layers", -1, "num_layers must be a positive int"),
        ("outer_dim", 0, "outer_dim must be a positive int"),
        ("page_size", 1.5, "page_size must be a positive int"),
        ("inner_dim", 0, "inner_dim must be a positive int"),
        ("dtype_width_bytes", 3, "dtype_width_bytes must be one of"),
        ("dtype_width_bytes", True, "dtype_width_bytes must be one of"),
        ("num_heads", 0, "num_heads must be a positive int"),
        ("num_heads", 3, "num_heads must divide inner_dim"),
    ],
)
def test_config_rejects_inconsistent_values(field, bad, match):
    with pytest.raises(InvalidArgumentError, match=match) as exc:
        _config(**{field: bad})
    assert exc.value.argument == field


def test_config_dims_checks():
    with pytest.raises(InvalidArgumentError, match="num_heads must be set"):
        _config(num_heads=None).dims("bf16")
    with pytest.raises(ShapeMismatchError, match="dtype is 4 bytes wide"):
        _config().dims(torch.float32)
