"""vectorized_copy and memcpy_batch against a plain per-pair copy."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvblocks.errors import InvalidArgumentError, LengthMismatchError, OverlapError
from kvblocks.kernels import (
    CopyPlan,
    available,
    has_memcpy_batch_async,
    memcpy_batch,
    memcpy_per_pair,
    pinned_programs,
    plan_copy,
    plan_memcpy,
    vectorized_copy,
)
from kvblocks.kernels.addresses import StridedTable, common_alignment
from kvblocks.kernels.memcpy import merge_runs

from .helpers import alloc, gpu_param

PLACES = [
    pytest.param(("cpu", "cpu"), id="cpu"),
    gpu_param(("device", "device")),
    gpu_param(("pinned", "device")),
    gpu_param(("device", "pinned")),
]


def _pairs(num_pairs, size, where, offset):
    """``num_pairs`` spans of ``size`` bytes at shuffled places, ``offset`` bytes off 16."""
    stride = (size + 16 + 15) // 16 * 16
    buf = alloc(num_pairs * stride + 16, torch.uint8, where)
    slots = torch.randperm(num_pairs).tolist()
    views = [buf[offset + s * stride : offset + s * stride + size] for s in slots]
    return buf, views, [v.data_ptr() for v in views]


def _check_copy(copy, num_pairs, size, places, src_off=0, dst_off=0):
    _, src, src_ptrs = _pairs(num_pairs, size, places[0], src_off)
    dst_buf, dst, dst_ptrs = _pairs(num_pairs, size, places[1], dst_off)
    for v in src:
        v.copy_(torch.randint(0, 256, (size,), dtype=torch.uint8))
    dst_buf.fill_(0xAB)
    copy(src_ptrs, dst_ptrs, size)
    if "cpu" not in places:
        torch.cuda.synchronize()
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(s.cpu(), d.cpu())
    written = sum(d.numel() for d in dst)
    assert int((dst_buf.cpu() != 0xAB).sum()) <= written  # nothing outside the spans changed
    untouched = dst_buf.cpu().clone()
    for d in dst:
        untouched[d.data_ptr() - dst_buf.data_ptr() :][: d.numel()] = 0xAB
    assert bool((untouched == 0xAB).all()), "bytes outside the destination spans changed"


def _device(places):
    return "cpu" if "cpu" in places else "cuda"


@pytest.mark.parametrize("places", PLACES)
@pytest.mark.parametrize("size", [1, 3, 17, 1000, 32768, 32772])
@pytest.mark.parametrize("offsets", [(0, 0), (1, 0), (0, 2), (4, 4), (8, 8)])
def test_vectorized_copy_sizes_and_alignments(size, offsets, places):
    device = _device(places)
    _check_copy(lambda s, d, n: vectorized_copy(s, d, n, device=device), 7, size, places, *offsets)


@pytest.mark.parametrize("places", PLACES)
@pytest.mark.parametrize("num_pairs,size", [(1, 1 << 20), (128, 4096), (1, 16)])
def test_vectorized_copy_pair_counts(num_pairs, size, places):
    device = _device(places)
    _check_copy(lambda s, d, n: vectorized_copy(s, d, n, device=device), num_pairs, size, places)


@pytest.mark.parametrize("places", PLACES)
@pytest.mark.parametrize("programs", [1, 3, 16, 1000])
@pytest.mark.parametrize("num_pairs,size", [(5, 40000), (128, 4100)])
def test_copy_on_a_capped_grid(programs, num_pairs, size, places):
    """Fewer programs than chunks: each program copies every ``programs``-th chunk, and every
    chunk of every pair is still written (more programs than chunks: one chunk each)."""
    device = _device(places)

    def copy(src, dst, n):
        plan = plan_copy(src, dst, n, device=device, programs=programs)
        chunks = num_pairs * -(-n // 16384)  # 16 KiB chunks of 4-byte words
        assert plan.num_programs == min(programs, chunks)
        plan.run()

    _check_copy(copy, num_pairs, size, places, 4, 4)


def test_pinned_programs():
    """Device memory: no cap. Pinned memory: enough readers to keep 256 KiB in flight, and
    never fewer than 8 programs."""
    assert pinned_programs(reads_host=False, writes_host=False, step_bytes=16384) is None
    assert pinned_programs(True, False, 16384) == 16
    assert pinned_programs(True, True, 16384) == 16
    assert pinned_programs(True, False, 32768) == 8
    assert pinned_programs(True, False, 65536) == 8
    assert pinned_programs(True, False, 1000) == 263
    assert pinned_programs(False, True, 16384) == 8
    assert pinned_programs(False, True, 64) == 8


@pytest.mark.parametrize(
    "size,align,step", [(1 << 20, 16, 16384), (32772, 4, 16384), (100, 4, 100), (7, 1, 7)]
)
def test_copy_step_bytes(size, align, step):
    plan = CopyPlan(
        StridedTable.flat(torch.tensor([64])),
        StridedTable.flat(torch.tensor([4096])),
        size,
        align,
        torch.device("cpu"),
        available("cpu"),
    )
    assert plan.step_bytes == step


@pytest.mark.parametrize("programs", [0, -1, 2.0, True])
def test_programs_must_be_positive(programs):
    with pytest.raises(InvalidArgumentError, match="programs must be a positive int"):
        plan_copy([1024], [4096], 16, device="cpu", programs=programs)


@pytest.mark.parametrize(
    "offsets,align", [((0, 0), 16), ((8, 8), 8), ((4, 12), 4), ((2, 0), 2), ((0, 1), 1)]
)
def test_access_width_follows_alignment(offsets, align):
    _, _, src = _pairs(3, 64, "cpu", offsets[0])
    _, _, dst = _pairs(3, 64, "cpu", offsets[1])
    assert plan_copy(src, dst, 64, device="cpu").align == align
    assert plan_copy(src, dst, 60, device="cpu").align == min(align, 4)


@settings(max_examples=20)
@given(
    num_pairs=st.integers(1, 9),
    size=st.integers(1, 5000),
    src_off=st.integers(0, 15),
    dst_off=st.integers(0, 15),
)
def test_vectorized_copy_random(num_pairs, size, src_off, dst_off):
    _check_copy(
        lambda s, d, n: vectorized_copy(s, d, n, device="cpu"),
        num_pairs,
        size,
        ("cpu", "cpu"),
        src_off,
        dst_off,
    )


@pytest.mark.parametrize("places", PLACES)
@pytest.mark.parametrize("per_block,size", [(1, 4096), (3, 1000), (5, 37)])
def test_copy_from_strided_tables(per_block, size, places):
    """Chunk ``c`` of block ``b`` at ``bases[c] + b * stride``: the kernel expands the tables."""
    space = (size + 64) // 16 * 16
    nblocks, stride = 9, per_block * space + 64
    src_buf = alloc(nblocks * stride, torch.uint8, places[0])
    dst_buf = alloc(nblocks * stride, torch.uint8, places[1])
    src_buf.copy_(torch.randint(0, 256, (src_buf.numel(),), dtype=torch.uint8))
    dst_buf.fill_(0xAB)
    offsets = torch.randperm(per_block) * space + 48
    src_ids = torch.randperm(nblocks)[:6]
    dst_ids = torch.randperm(nblocks)[:6]
    device = torch.device(_device(places))
    src, dst = (
        StridedTable(ids.to(device), (buf.data_ptr() + offsets).to(device), stride)
        for ids, buf in ((src_ids, src_buf), (dst_ids, dst_buf))
    )
    align = common_alignment(src.expand(), dst.expand(), size)
    CopyPlan(src, dst, size, align, device, available(device)).run()
    expected = torch.full((nblocks * stride,), 0xAB, dtype=torch.uint8)
    src_host = src_buf.cpu()
    for s_id, d_id in zip(src_ids.tolist(), dst_ids.tolist(), strict=True):
        for offset in offsets.tolist():
            d, s = d_id * stride + offset, s_id * stride + offset
            expected[d : d + size] = src_host[s : s + size]
    assert torch.equal(dst_buf.cpu(), expected)


@pytest.mark.parametrize("places", PLACES)
@pytest.mark.parametrize("copy", [memcpy_batch, memcpy_per_pair])
def test_memcpy_paths(copy, places):
    _check_copy(copy, 33, 4099, places, 3, 5)


def test_memcpy_per_pair_sizes():
    _, src, src_ptrs = _pairs(4, 100, "cpu", 0)
    _, dst, dst_ptrs = _pairs(4, 100, "cpu", 0)
    for v in src:
        v.copy_(torch.randint(0, 256, (100,), dtype=torch.uint8))
    sizes = [1, 50, 99, 100]
    memcpy_batch(src_ptrs, dst_ptrs, sizes)
    for s, d, n in zip(src, dst, sizes, strict=True):
        assert torch.equal(s[:n], d[:n])


def test_has_memcpy_batch_async_matches_machine():
    if not torch.cuda.is_available():
        assert has_memcpy_batch_async() is False
    else:
        assert isinstance(has_memcpy_batch_async(), bool)


@pytest.mark.parametrize("copy", [vectorized_copy, memcpy_batch])
def test_copy_errors(copy):
    buf = torch.zeros(1024, dtype=torch.uint8)
    base = buf.data_ptr()
    kwargs = {"device": "cpu"} if copy is vectorized_copy else {}
    with pytest.raises(LengthMismatchError, match="dst_ptrs must hold 2 addresses, got 1"):
        copy([base, base + 64], [base + 512], 16, **kwargs)
    with pytest.raises(OverlapError, match="dst_ptrs entries 0 and 1 overlap"):
        copy([base, base + 64], [base + 512, base + 520], 16, **kwargs)
    with pytest.raises(OverlapError, match="dst_ptrs entry 0 overlaps a span of src_ptrs"):
        copy([base], [base + 8], 16, **kwargs)
    with pytest.raises(InvalidArgumentError, match="null address"):
        copy([0], [base], 16, **kwargs)
    assert bool((buf == 0).all())


def test_memcpy_plan_overlap_check_can_be_skipped():
    buf = torch.zeros(1024, dtype=torch.uint8)
    base = buf.data_ptr()
    with pytest.raises(OverlapError):
        plan_memcpy([base, base + 64], [base + 512, base + 520], 16)
    plan = plan_memcpy([base, base + 64], [base + 512, base + 520], 16, check_overlap=False)
    assert plan.dst == [base + 512, base + 520]  # the caller vouched for its pairs
    with pytest.raises(LengthMismatchError):  # the other checks still hold
        plan_memcpy([base, base + 64], [base + 512], 16, check_overlap=False)
    with pytest.raises(InvalidArgumentError, match="null address"):
        plan_memcpy([0], [base], 16, check_overlap=False)


def test_size_must_be_positive():
    with pytest.raises(InvalidArgumentError, match="size must be a positive int"):
        vectorized_copy([1], [2], 0, device="cpu")
    with pytest.raises(InvalidArgumentError, match="sizes must all be positive"):
        memcpy_batch([16], [64], [0])


def test_merge_runs_joins_pairs_that_continue_on_both_sides():
    """Runs of random lengths at random places: each becomes one pair, and the merged pairs
    copy the same bytes as the pairs they replace."""
    size, slots = 100, 64
    lengths = torch.randint(1, 6, (8,)).tolist()
    src_buf = torch.randint(0, 256, (slots * size,), dtype=torch.uint8)
    dst_buf = torch.full((slots * size,), 0xAB, dtype=torch.uint8)
    want = dst_buf.clone()

    def places(order):
        """First slot of each run, runs in ``order``, a free slot between neighbours."""
        at, first = 0, {}
        for r in order:
            first[r] = at
            at += lengths[r] + 1
        return first

    src_at = places(range(len(lengths)))
    dst_at = places(torch.randperm(len(lengths)).tolist())
    src, dst = [], []
    for r, n in enumerate(lengths):
        for i in range(n):
            s, d = (src_at[r] + i) * size, (dst_at[r] + i) * size
            src.append(src_buf.data_ptr() + s)
            dst.append(dst_buf.data_ptr() + d)
            want[d : d + size] = src_buf[s : s + size]
    plan = plan_memcpy(src, dst, size, merge=True)
    assert plan.sizes == [n * size for n in lengths]
    assert plan.src == [src_buf.data_ptr() + src_at[r] * size for r in range(len(lengths))]
    plan.run()
    assert torch.equal(dst_buf, want)
    assert plan_memcpy(src, dst, size).sizes == [size] * sum(lengths)  # merged only if asked


def test_merge_runs_needs_both_sides_to_continue():
    a, b = 1 << 20, 1 << 30
    assert merge_runs([a, a + 10, a + 15], [b, b + 10, b + 16], [10, 5, 5]) == (
        [a, a + 15],
        [b, b + 16],
        [15, 5],
    )
    assert merge_runs([a, a + 10], [b + 10, b], [10, 10]) == ([a, a + 10], [b + 10, b], [10, 10])
    assert merge_runs([], [], []) == ([], [], [])
