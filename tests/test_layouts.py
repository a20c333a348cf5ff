"""Layouts: region addresses, address tables, agreement with real tensors, and errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvblocks.errors import (
    BlockIdOutOfRangeError,
    InvalidArgumentError,
    LayoutFormatError,
    LengthMismatchError,
    ShapeMismatchError,
)
from kvblocks.layout import (
    BlockDimension,
    FullyContiguousLayout,
    KvBlockLayout,
    LayerSeparateLayout,
    LayoutConfig,
    LayoutKind,
    MemoryRegion,
    OuterSeparateLayout,
)

from .helpers import read_bytes

configs = st.builds(
    LayoutConfig,
    num_blocks=st.integers(1, 9),
    num_layers=st.integers(1, 5),
    outer_dim=st.integers(1, 2),
    page_size=st.integers(1, 8),
    inner_dim=st.integers(1, 24),
    dtype_width_bytes=st.sampled_from([1, 2, 4, 8]),
)


def _fc(cfg, base=4096, fmt=KvBlockLayout.OperationalNHD):
    return FullyContiguousLayout(cfg, MemoryRegion(base, cfg.total_bytes), fmt)


def _ls(cfg, block_dim, bases=None, fmt=KvBlockLayout.OperationalNHD):
    per_layer = LayerSeparateLayout.required_allocations(cfg)[0]
    # Layers deliberately out of address order with gaps between them.
    bases = bases or [(cfg.num_layers - l) * (per_layer + 4096) for l in range(cfg.num_layers)]
    return LayerSeparateLayout(cfg, [MemoryRegion(b, per_layer) for b in bases], block_dim, fmt)


@given(cfg=configs, base=st.integers(0, 1 << 40))
def test_fully_contiguous_addresses(cfg, base):
    lay = _fc(cfg, base)
    rb = cfg.region_bytes
    ids = list(range(cfg.num_blocks))[::-1]
    table = lay.region_table(ids)
    assert len(table) == cfg.num_blocks * cfg.num_layers * cfg.outer_dim
    i = 0
    for b in ids:
        for l in range(cfg.num_layers):
            for o in range(cfg.outer_dim):
                expected = base + ((b * cfg.num_layers + l) * cfg.outer_dim + o) * rb
                assert lay.region(b, l, o) == MemoryRegion(expected, rb)
                assert table[i] == expected
                i += 1
    assert list(lay.block_table(ids)) == [base + b * cfg.block_bytes for b in ids]
    assert lay.block_region(ids[0]) == MemoryRegion(
        base + ids[0] * cfg.block_bytes, cfg.block_bytes
    )
    last = cfg.num_layers - 1
    for layers in (range(last, cfg.num_layers), range(0, max(last, 1))):
        some = list(lay.region_table(ids, layers))
        assert some == [
            lay.region(b, l, o).addr for b in ids for l in layers for o in range(cfg.outer_dim)
        ]


def check_regions(lay, ids, layers, address) -> None:
    """``lay.region`` and ``lay.region_table(ids, layers)`` (block-major, then layer, then
    outer) give ``address(b, l, o)`` for every region."""
    no, rb = lay.config.outer_dim, lay.config.region_bytes
    table = lay.region_table(ids, layers)
    assert len(table) == len(ids) * len(layers) * no
    expected = [address(b, l, o) for b in ids for l in layers for o in range(no)]
    assert list(table) == expected
    for b, l, o in ((b, l, o) for b in ids for l in layers for o in range(no)):
        assert lay.region(b, l, o) == MemoryRegion(address(b, l, o), rb)


@given(cfg=configs, block_dim=st.sampled_from(BlockDimension), data=st.data())
def test_layer_separate_addresses(cfg, block_dim, data):
    bases = data.draw(
        st.lists(st.integers(0, 1 << 40), min_size=cfg.num_layers, max_size=cfg.num_layers)
    )
    lay = _ls(cfg, block_dim, bases)
    rb, nb, no = cfg.region_bytes, cfg.num_blocks, cfg.outer_dim
    ids = data.draw(st.lists(st.integers(0, nb - 1), min_size=1, max_size=12))
    layers = data.draw(
        st.integers(0, cfg.num_layers - 1).flatmap(
            lambda a: st.integers(a + 1, cfg.num_layers).map(lambda b: range(a, b))
        )
    )
    if block_dim is BlockDimension.BLOCK_FIRST:
        check_regions(lay, ids, layers, lambda b, l, o: bases[l] + (b * no + o) * rb)
    else:
        check_regions(lay, ids, layers, lambda b, l, o: bases[l] + (o * nb + b) * rb)


@given(cfg=configs, data=st.data())
def test_outer_separate_addresses(cfg, data):
    nl, no, nb, rb = cfg.num_layers, cfg.outer_dim, cfg.num_blocks, cfg.region_bytes
    bases = data.draw(st.lists(st.integers(0, 1 << 40), min_size=nl * no, max_size=nl * no))
    lay = OuterSeparateLayout(cfg, [MemoryRegion(b, nb * rb) for b in bases])
    assert lay.kind is LayoutKind.OUTER_SEPARATE and not lay.is_fully_contiguous
    ids = data.draw(st.lists(st.integers(0, nb - 1), min_size=1, max_size=12))
    start = data.draw(st.integers(0, nl - 1))
    layers = range(start, data.draw(st.integers(start + 1, nl)))
    check_regions(lay, ids, layers, lambda b, l, o: bases[l * no + o] + b * rb)


def test_fully_contiguous_matches_a_torch_tensor():
    cfg = LayoutConfig(
        num_blocks=5, num_layers=3, outer_dim=2, page_size=4, inner_dim=6, dtype_width_bytes=4
    )
    t = torch.randn(5, 3, 2, 4 * 6)  # [nb, nl, no, inner]
    lay = FullyContiguousLayout(cfg, MemoryRegion.of(t), KvBlockLayout.OperationalNHD)
    for b in range(5):
        assert read_bytes(*_span(lay.block_region(b))) == t[b].numpy().tobytes()
        for l in range(3):
            for o in range(2):
                assert read_bytes(*_span(lay.region(b, l, o))) == t[b, l, o].numpy().tobytes()


def _bf16_config(nb, nl, no, nt, nh, hd) -> LayoutConfig:
    return LayoutConfig(
        num_blocks=nb,
        num_layers=nl,
        outer_dim=no,
        page_size=nt,
        inner_dim=nh * hd,
        dtype_width_bytes=2,
        num_heads=nh,
    )


@pytest.mark.parametrize("block_dim", list(BlockDimension))
def test_layer_separate_matches_engine_tensors(block_dim):
    nb, nl, no, nt, nh, hd = 6, 3, 2, 4, 2, 3
    cfg = _bf16_config(nb, nl, no, nt, nh, hd)
    shape = (
        (nb, no, nt, nh, hd) if block_dim is BlockDimension.BLOCK_FIRST else (no, nb, nt, nh, hd)
    )
    layers = [torch.randn(shape).to(torch.bfloat16) for _ in range(nl)]
    lay = LayerSeparateLayout(cfg, [MemoryRegion.of(t) for t in layers], block_dim)
    for b in range(nb):
        for l in range(nl):
            for o in range(no):
                page = (
                    layers[l][b, o] if block_dim is BlockDimension.BLOCK_FIRST else layers[l][o, b]
                )
                got = read_bytes(*_span(lay.region(b, l, o)))
                assert got == page.view(torch.int16).numpy().tobytes()


def test_outer_separate_matches_separate_k_and_v_tensors():
    nb, nl, no, nt, nh, hd = 5, 3, 2, 4, 2, 3
    cfg = _bf16_config(nb, nl, no, nt, nh, hd)
    k = [torch.randn(nb, nt, nh, hd).to(torch.bfloat16) for _ in range(nl)]
    v = [torch.randn(nb, nt, nh, hd).to(torch.bfloat16) for _ in range(nl)]
    buffers = [t for pair in zip(k, v, strict=True) for t in pair]  # K0, V0, K1, V1, ...
    lay = OuterSeparateLayout(cfg, [MemoryRegion.of(t) for t in buffers])
    for b in range(nb):
        for l in range(nl):
            for o, kv in enumerate((k, v)):
                got = read_bytes(*_span(lay.region(b, l, o)))
                assert got == kv[l][b].view(torch.int16).numpy().tobytes()


def _span(region):
    return region.addr, region.size


def _small():
    return LayoutConfig(
        num_blocks=4, num_layers=2, outer_dim=2, page_size=2, inner_dim=4, dtype_width_bytes=2
    )


@pytest.mark.parametrize(
    "args,argument",
    [
        ((4, 0, 0), "block_id"),
        ((-1, 0, 0), "block_id"),
        ((0, 2, 0), "layer_id"),
        ((0, 0, 2), "outer_id"),
    ],
)
def test_region_out_of_range(args, argument):
    cfg = _small()
    per_region = OuterSeparateLayout.required_allocations(cfg)[0]
    outer_separate = OuterSeparateLayout(cfg, [MemoryRegion(0, per_region)] * 4)
    for lay in (_fc(cfg), _ls(cfg, BlockDimension.OUTER_FIRST), outer_separate):
        with pytest.raises(BlockIdOutOfRangeError) as exc:
            lay.region(*args)
        assert exc.value.argument == argument


def test_table_errors_name_the_argument():
    lay = _fc(_small())
    with pytest.raises(BlockIdOutOfRangeError, match=r"block_ids must be in \[0, 4\), got 7"):
        lay.region_table([0, 7])
    with pytest.raises(BlockIdOutOfRangeError, match="block_ids"):
        lay.block_table([-1])
    with pytest.raises(InvalidArgumentError, match="block_ids must hold ints"):
        lay.region_table([0.5])
    with pytest.raises(BlockIdOutOfRangeError, match="layers must be a non-empty range"):
        lay.region_table([0], range(1, 3))
    with pytest.raises(BlockIdOutOfRangeError, match="layers"):
        lay.region_table([0], range(1, 1))
    with pytest.raises(InvalidArgumentError, match="layers must be a range with step 1"):
        lay.region_table([0], [0, 1])
    assert len(lay.region_table([])) == 0


def test_memory_errors():
    cfg = _small()
    per_layer = LayerSeparateLayout.required_allocations(cfg)[0]
    with pytest.raises(LengthMismatchError, match="memory must hold 2 allocations"):
        LayerSeparateLayout(cfg, [MemoryRegion(0, per_layer)])
    with pytest.raises(ShapeMismatchError, match=r"memory\[1\] is 3 bytes"):
        LayerSeparateLayout(cfg, [MemoryRegion(0, per_layer), MemoryRegion(0, 3)])
    with pytest.raises(ShapeMismatchError, match=r"memory\[0\] is"):
        FullyContiguousLayout(cfg, MemoryRegion(0, cfg.total_bytes - 1))
    per_region = OuterSeparateLayout.required_allocations(cfg)[0]
    assert per_region * 2 == per_layer
    with pytest.raises(LengthMismatchError, match="memory must hold 4 allocations"):
        OuterSeparateLayout(cfg, [MemoryRegion(0, per_region)] * 2)
    with pytest.raises(InvalidArgumentError, match=r"memory\[0\] must be a MemoryRegion"):
        FullyContiguousLayout(cfg, (0, cfg.total_bytes))
    with pytest.raises(InvalidArgumentError, match="addr must be a non-negative int"):
        MemoryRegion(-1, 4)
    with pytest.raises(InvalidArgumentError, match="size must be a non-negative int"):
        MemoryRegion(0, 2.5)


def test_format_rules():
    cfg = _small()
    with pytest.raises(LayoutFormatError, match="kv_format must be operational"):
        _ls(cfg, BlockDimension.BLOCK_FIRST, fmt=KvBlockLayout.UniversalTP)
    with pytest.raises(LayoutFormatError, match="kv_format must be operational"):
        OuterSeparateLayout(cfg, [MemoryRegion(0, 64)] * 4, KvBlockLayout.UniversalPP)
    with pytest.raises(InvalidArgumentError, match="block_dim must be a BlockDimension"):
        LayerSeparateLayout(cfg, [MemoryRegion(0, 64)] * 2, "block_first")
    uni = _fc(cfg, fmt=KvBlockLayout.UniversalTP)
    with pytest.raises(LayoutFormatError, match="not contiguous regions"):
        uni.region(0, 0, 0)
    with pytest.raises(LayoutFormatError):
        uni.region_table([0])
    assert uni.block_region(1).size == cfg.block_bytes
    assert _fc(cfg, fmt=KvBlockLayout.Unknown).region(1, 1, 1).size == cfg.region_bytes


def test_memory_region_of_tensor():
    t = torch.zeros(4, 6, dtype=torch.float16)
    assert MemoryRegion.of(t) == MemoryRegion(t.data_ptr(), 48)
    with pytest.raises(InvalidArgumentError, match="tensor must be contiguous"):
        MemoryRegion.of(t.t())


def test_memory_region_overlap():
    a = MemoryRegion(100, 50)
    assert a.end == 150
    assert a.overlaps(MemoryRegion(149, 10)) and a.overlaps(MemoryRegion(90, 11))
    assert not a.overlaps(MemoryRegion(150, 10)) and not a.overlaps(MemoryRegion(90, 10))
