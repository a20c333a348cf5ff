"""Permute kernels against the torch reference: every conversion, dtype and inner order.

On the CPU they run under Triton's interpreter (the same kernel source that the GPU compiles);
the ``cuda`` cases run compiled on the GPU, with regions in device or pinned host memory.
"""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvblocks.errors import (
    InvalidArgumentError,
    LayoutFormatError,
    LengthMismatchError,
    OverlapError,
)
from kvblocks.kernels import Backend, Operand, available, permute, plan_permute
from kvblocks.kernels import permutes as kp
from kvblocks.kernels.addresses import StridedTable
from kvblocks.kernels.reference import convert
from kvblocks.layout import BlockDim, InnerOrder, KvBlockLayout, KvDims

from .helpers import (
    ALL_DTYPES,
    assert_bits_equal,
    assert_written,
    fill_random,
    gpu_param,
    poisoned,
    random_tensor,
    scattered,
)

N, H = InnerOrder.NHD, InnerOrder.HND
PLACES = [
    pytest.param(("cpu", "cpu"), id="cpu"),
    gpu_param(("device", "device")),
    gpu_param(("pinned", "device")),
    gpu_param(("device", "pinned")),
]

# (public function, source operand, destination operand, extra order arguments)
CONVERSIONS = (
    [(kp.universal_from_block, Operand.block_stack(o), Operand.universal(), (o,)) for o in (N, H)]
    + [(kp.block_from_universal, Operand.universal(), Operand.block_stack(o), (o,)) for o in (N, H)]
    + [
        (kp.universal_from_operational, Operand.operational(o), Operand.universal(), (o,))
        for o in (N, H)
    ]
    + [
        (kp.operational_from_universal, Operand.universal(), Operand.operational(o), (o,))
        for o in (N, H)
    ]
    + [
        (kp.operational_from_block, Operand.block_stack(a), Operand.operational(b), (a, b))
        for a in (N, H)
        for b in (N, H)
    ]
    + [
        (kp.block_from_operational, Operand.operational(a), Operand.block_stack(b), (a, b))
        for a in (N, H)
        for b in (N, H)
    ]
)


def _conv_id(case):
    fn, _, _, orders = case
    return f"{fn.__name__}-{'-'.join(o.name for o in orders)}"


def _operand_views(op: Operand, dims: KvDims, nb: int, where: str, offset: int = 0):
    if op.stack:
        shape = dims.region_shape(op.format.inner_order)
        return scattered(nb * dims.nl * dims.no, shape, dims.dtype, where, offset)
    return scattered(nb, dims.block_shape(op.format), dims.dtype, where, offset)


def _device(places):
    return "cuda" if "device" in places or "pinned" in places else "cpu"


def run_and_check(dims, nb, src_op, dst_op, places, call, offset=0):
    src, src_table = _operand_views(src_op, dims, nb, places[0], offset)
    dst, dst_table = _operand_views(dst_op, dims, nb, places[1], offset)
    fill_random(src, dims.dtype)
    call(src_table, dst_table)
    if _device(places) == "cuda":
        torch.cuda.synchronize()
    for v in dst:
        assert_written(v)
    for got, want in zip(dst, _converted(src, src_op, dst, dst_op, dims), strict=True):
        assert_bits_equal(got.cpu(), want)


def _converted(src, src_op, dst, dst_op, dims) -> list[torch.Tensor]:
    """What the reference writes into (CPU copies of) ``dst`` from ``src``."""
    expected = [torch.empty_like(v, device="cpu") for v in dst]
    convert(
        [s.cpu() for s in src],
        expected,
        dims,
        src_op.format,
        dst_op.format,
        src_is_stack=src_op.stack,
        dst_is_stack=dst_op.stack,
    )
    return expected


@pytest.mark.parametrize("places", PLACES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("case", CONVERSIONS, ids=_conv_id)
def test_named_conversions(case, dtype, places):
    fn, src_op, dst_op, orders = case
    dims = KvDims(nl=3, no=2, nh=4, nt=8, hd=16, dtype=dtype)
    device = _device(places)
    run_and_check(
        dims, 3, src_op, dst_op, places, lambda s, d: fn(s, d, dims, *orders, device=device)
    )


@pytest.mark.parametrize("places", PLACES)
@pytest.mark.parametrize("nb", [1, 128])
@pytest.mark.parametrize("case", CONVERSIONS[:4], ids=_conv_id)
def test_block_counts(case, nb, places):
    fn, src_op, dst_op, orders = case
    dims = KvDims(nl=2, no=2, nh=2, nt=4, hd=8, dtype=torch.bfloat16)
    device = _device(places)
    run_and_check(
        dims, nb, src_op, dst_op, places, lambda s, d: fn(s, d, dims, *orders, device=device)
    )


@pytest.mark.parametrize("places", PLACES)
@pytest.mark.parametrize("programs", [1, 5, 1000])
@pytest.mark.parametrize("case", CONVERSIONS[::5], ids=_conv_id)
def test_permute_on_a_capped_grid(case, programs, places):
    """Fewer programs than tiles: each program moves every ``programs``-th tile (here two
    tiles per region), and every row still lands."""
    _, src_op, dst_op, _ = case
    dims = KvDims(nl=2, no=2, nh=8, nt=64, hd=64, dtype=torch.float32)  # 128 KiB regions
    device = _device(places)

    def call(src_table, dst_table):
        plan = plan_permute(src_table, src_op, dst_table, dst_op, dims, device, programs=programs)
        if plan.backend is not Backend.REFERENCE:
            assert plan.launch[0] == (3 * 2 * 2, 2)  # regions, tiles per region
            assert plan.num_programs == min(programs, 3 * 2 * 2 * 2)
        plan.run()

    run_and_check(dims, 3, src_op, dst_op, places, call)


@pytest.mark.parametrize("programs", [0, 1.5, False])
def test_programs_must_be_positive(programs):
    dims = KvDims(nl=1, no=2, nh=1, nt=1, hd=4, dtype=torch.float32)
    with pytest.raises(InvalidArgumentError, match="programs must be a positive int"):
        plan_permute(
            [64], Operand.universal(), [4096], Operand.universal(), dims, "cpu", programs=programs
        )


@pytest.mark.parametrize("places", PLACES)
@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("hd", [3, 5, 24])
@pytest.mark.parametrize("case", CONVERSIONS[::3], ids=_conv_id)
def test_odd_sizes_and_unaligned_pointers(case, hd, offset, places):
    """Rows of 6, 10 or 48 bytes, at addresses 2 or 6 bytes past 16-byte alignment."""
    fn, src_op, dst_op, orders = case
    dims = KvDims(nl=2, no=2, nh=3, nt=5, hd=hd, dtype=torch.float16)
    device = _device(places)
    plan = plan_permute(*_tables(src_op, dst_op, dims, 2, places, offset), dims, device)
    assert not plan.aligned
    run_and_check(
        dims,
        2,
        src_op,
        dst_op,
        places,
        lambda s, d: fn(s, d, dims, *orders, device=device),
        offset,
    )


def _strided_operand(op: Operand, dims: KvDims, nblocks: int, where: str):
    """All ``nblocks`` blocks of ``op`` in one poisoned buffer: a block stack layer-major (one
    run of regions per ``(layer, outer)``, as an engine's per-layer caches), else block-major.
    Returns the buffer and the table's bases and stride."""
    if op.stack:
        shape = (dims.nl * dims.no, nblocks, *dims.region_shape(op.format.inner_order))
    else:
        shape = (nblocks, *dims.block_shape(op.format))
    buf = poisoned(shape, dims.dtype, "cuda" if where != "cpu" else "cpu")
    if where == "pinned":
        buf = buf.cpu().pin_memory()
    if op.stack:
        bases = torch.tensor([buf[i].data_ptr() for i in range(dims.nl * dims.no)])
        return buf, bases, dims.region_bytes
    return buf, torch.tensor([buf.data_ptr()]), dims.block_bytes


@pytest.mark.parametrize("places", PLACES)
@pytest.mark.parametrize(
    "src_op,dst_op",
    [
        (Operand.block_stack(H), Operand.universal()),
        (Operand.universal(), Operand.block_stack(N)),
        (Operand.operational(N), Operand.block_stack(H)),
    ],
    ids=["stack-to-universal", "universal-to-stack", "operational-to-stack"],
)
@pytest.mark.parametrize("reference", [False, True], ids=["kernel", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.uint8], ids=str)
def test_permute_from_strided_tables(src_op, dst_op, places, reference, dtype):
    """Tables given as per-block bases and block ids: the kernel expands them, and the torch
    reference (what runs on a CPU without Triton's interpreter) moves whole rows of blocks,
    1-byte types included (torch has no indexed copies of fp8 on the CPU)."""
    dims = KvDims(nl=3, no=2, nh=4, nt=8, hd=16, dtype=dtype)
    nblocks = 7
    device = torch.device(_device(places))
    src_buf, src_bases, src_stride = _strided_operand(src_op, dims, nblocks, places[0])
    dst_buf, dst_bases, dst_stride = _strided_operand(dst_op, dims, nblocks, places[1])
    src_buf.copy_(random_tensor(src_buf.shape, dims.dtype))
    src_ids, dst_ids = torch.randperm(nblocks)[:4], torch.randperm(nblocks)[:4]
    plan = kp.PermutePlan.of_checked_tables(
        src_op,
        StridedTable(src_ids.to(device), src_bases.to(device), src_stride),
        dst_op,
        StridedTable(dst_ids.to(device), dst_bases.to(device), dst_stride),
        dims,
        device,
        aligned=True,
    )
    if reference:
        plan = dataclasses.replace(plan, backend=Backend.REFERENCE)
    expected = dst_buf.cpu().clone()
    convert(
        [v.cpu() for b in src_ids.tolist() for v in _views_of(src_buf, src_op, b)],
        [v for b in dst_ids.tolist() for v in _views_of(expected, dst_op, b)],
        dims,
        src_op.format,
        dst_op.format,
        src_is_stack=src_op.stack,
        dst_is_stack=dst_op.stack,
    )
    plan.run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert_bits_equal(dst_buf.cpu(), expected)
    for b in dst_ids.tolist():
        for v in _views_of(dst_buf, dst_op, b):
            assert_written(v.cpu())


def _views_of(buf: torch.Tensor, op: Operand, block: int) -> list[torch.Tensor]:
    return list(buf[:, block]) if op.stack else [buf[block]]


def _tables(src_op, dst_op, dims, nb, places, offset):
    _, src_table = _operand_views(src_op, dims, nb, places[0], offset)
    _, dst_table = _operand_views(dst_op, dims, nb, places[1], offset)
    return src_table, src_op, dst_table, dst_op


FORMATS = st.one_of(
    st.sampled_from([KvBlockLayout.UniversalTP, KvBlockLayout.UniversalPP]),
    st.permutations(list(BlockDim)).map(KvBlockLayout.Custom),
    st.sampled_from(list(InnerOrder)).map(lambda o: o.operational),
)
OPERANDS = st.one_of(
    FORMATS.map(Operand), st.sampled_from(list(InnerOrder)).map(Operand.block_stack)
)


@settings(max_examples=25)
@given(
    dims=st.builds(
        KvDims,
        nl=st.integers(1, 3),
        no=st.integers(1, 2),
        nh=st.integers(1, 4),
        nt=st.integers(1, 6),
        hd=st.sampled_from([1, 2, 8, 12, 32]),
        dtype=st.sampled_from(ALL_DTYPES),
    ),
    nb=st.integers(1, 3),
    src_op=OPERANDS,
    dst_op=OPERANDS,
)
def test_any_operands_random_dims(dims, nb, src_op, dst_op):
    run_and_check(
        dims,
        nb,
        src_op,
        dst_op,
        ("cpu", "cpu"),
        lambda s, d: permute(s, src_op, d, dst_op, dims, device="cpu"),
    )


@pytest.mark.gpu
def test_large_block_wide_offsets():
    """A block past 2**31 elements needs 64-bit offsets inside the kernel."""
    big = KvDims(nl=130, no=2, nh=32, nt=2048, hd=128, dtype="fp8_e4m3")
    assert big.block_elems > 2**31
    if torch.cuda.mem_get_info()[0] < 3 * big.block_bytes:
        pytest.skip("not enough GPU memory")
    src = torch.randint(0, 255, (big.block_elems,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    kp.operational_from_universal([src.data_ptr()], [dst.data_ptr()], big, N, device="cuda")
    back = torch.empty_like(src)
    kp.universal_from_operational([dst.data_ptr()], [back.data_ptr()], big, N, device="cuda")
    assert torch.equal(back, src)


def test_backend_on_this_machine():
    expected = Backend.TRITON if torch.cuda.is_available() else Backend.INTERPRETER
    assert available() is expected


def test_errors_and_nothing_written():
    dims = KvDims(nl=2, no=2, nh=2, nt=4, hd=8, dtype=torch.bfloat16)
    src, src_table = _operand_views(Operand.block_stack(N), dims, 2, "cpu")
    dst, dst_table = _operand_views(Operand.universal(), dims, 2, "cpu")
    fill_random(src, dims.dtype)
    run = kp.universal_from_block
    cases = [
        (
            LengthMismatchError,
            "src_table must hold a positive multiple of 4",
            (src_table[:7], dst_table),
        ),
        (LengthMismatchError, "dst_table must hold 2 addresses, got 1", (src_table, dst_table[:1])),
        (InvalidArgumentError, "src_table holds a null address", ([0] + src_table[1:], dst_table)),
        (
            InvalidArgumentError,
            r"dst_table\[1\] = 0x[0-9a-f]+ is not aligned to 2 bytes",
            (src_table, [dst_table[0], dst_table[1] + 1]),
        ),
        (
            OverlapError,
            "dst_table entry 0 overlaps a span of src_table",
            (src_table, [min(src_table), dst_table[1]]),  # a block from the source buffer's start
        ),
        (OverlapError, "dst_table entries 0 and 1 overlap", (src_table, [dst_table[0]] * 2)),
        (InvalidArgumentError, "src_table must hold ints", (["a"] * 8, dst_table)),
        (InvalidArgumentError, "src_table must be a 1-d int64 tensor", (torch.zeros(8), dst_table)),
    ]
    for error, match, (s, d) in cases:
        with pytest.raises(error, match=match):
            run(s, d, dims, N, device="cpu")
    with pytest.raises(InvalidArgumentError, match="dims must be a KvDims"):
        run(src_table, dst_table, (2, 2, 2, 4, 8), N, device="cpu")
    with pytest.raises(LayoutFormatError, match="format must state its dimension order"):
        Operand(KvBlockLayout.Unknown)
    with pytest.raises(LayoutFormatError, match="block stack must be operational"):
        Operand(KvBlockLayout.UniversalTP, stack=True)
    for v in dst:
        assert bool((v.view(torch.int16) == -1).all()), "a rejected call wrote memory"


LAYER_PAIRS = [
    (Operand.block_stack(N), Operand.universal()),
    (Operand.universal(), Operand.block_stack(H)),
    (Operand.universal(), Operand.operational(N)),
    (Operand.operational(H), Operand.universal()),
    (Operand(KvBlockLayout.UniversalPP), Operand.block_stack(N)),
    (Operand.block_stack(H), Operand.operational(N)),
]


def _layer_parts(views, op: Operand, dims: KvDims, layer: int) -> list[torch.Tensor]:
    """The elements of layer ``layer`` of every block: its regions of a stack, or a slice of
    each whole block."""
    if op.stack:
        return [v for i, v in enumerate(views) if i // dims.no % dims.nl == layer]
    axis = op.format.dim_order.index(BlockDim.LAYER)
    return [v.view(dims.block_shape(op.format)).narrow(axis, layer, 1) for v in views]


def _table_of(views, op: Operand, dims: KvDims, layers: range) -> list[int]:
    """Addresses of a permute of ``layers``: their regions of a stack, else whole blocks."""
    if not op.stack:
        return [v.data_ptr() for v in views]
    return [v.data_ptr() for i, v in enumerate(views) if i // dims.no % dims.nl in layers]


def _permute_layers(src, src_op, dst, dst_op, dims, layers, device, reference) -> None:
    """Permute layers ``layers`` of the blocks of views ``src`` into ``dst`` (the kernel, or
    the torch reference with ``reference``); returns when it is done."""
    plan = plan_permute(
        _table_of(src, src_op, dims, layers),
        src_op,
        _table_of(dst, dst_op, dims, layers),
        dst_op,
        dims,
        device,
        layers=layers,
    )
    if reference:
        plan = dataclasses.replace(plan, backend=Backend.REFERENCE)
    plan.run()
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("places", PLACES)
@pytest.mark.parametrize("reference", [False, True], ids=["kernel", "reference"])
@pytest.mark.parametrize(
    ("src_op", "dst_op"), LAYER_PAIRS, ids=lambda op: f"{op.format.name}{'-stack' * op.stack}"
)
def test_a_permute_of_some_layers_writes_those_layers_only(src_op, dst_op, places, reference):
    dims = KvDims(nl=5, no=2, nh=4, nt=8, hd=16, dtype=torch.bfloat16)
    nb = 3
    device = _device(places)
    src, _ = _operand_views(src_op, dims, nb, places[0])
    dst, _ = _operand_views(dst_op, dims, nb, places[1])
    fill_random(src, dims.dtype)
    expected = _converted(src, src_op, dst, dst_op, dims)
    for layers in (range(0, 2), range(2, 3), range(1, 5), range(4, 5)):
        for v in dst:
            v.copy_(poisoned(v.shape, dims.dtype))
        _permute_layers(src, src_op, dst, dst_op, dims, layers, device, reference)
        for layer in range(dims.nl):
            got = _layer_parts([v.cpu() for v in dst], dst_op, dims, layer)
            if layer in layers:
                for g, want in zip(got, _layer_parts(expected, dst_op, dims, layer), strict=True):
                    assert_bits_equal(g, want)
            else:
                for g in got:
                    assert_bits_equal(g, poisoned(g.shape, dims.dtype))


# (operand of every layer, operand whose blocks hold the moved layers only, into the latter)
SLOT_PAIRS = [
    (Operand.block_stack(N), Operand(KvBlockLayout.UniversalTP, moved_layers_only=True), True),
    (Operand.operational(H), Operand(KvBlockLayout.UniversalPP, moved_layers_only=True), True),
    (Operand.block_stack(H), Operand(KvBlockLayout.UniversalTP, moved_layers_only=True), False),
    (Operand.operational(N), Operand(KvBlockLayout.UniversalTP, moved_layers_only=True), False),
]


@pytest.mark.parametrize("places", PLACES)
@pytest.mark.parametrize("reference", [False, True], ids=["kernel", "reference"])
@pytest.mark.parametrize(
    ("full_op", "slot_op", "into_slot"),
    SLOT_PAIRS,
    ids=lambda v: v.format.name if isinstance(v, Operand) else ("into" if v else "out-of"),
)
def test_a_permute_of_some_layers_into_or_out_of_blocks_of_those_layers(
    full_op, slot_op, into_slot, places, reference
):
    """A staging slot's blocks hold only the moved layers: layer ``l`` of the other side is
    layer ``l - layers.start`` of theirs."""
    dims = KvDims(nl=5, no=2, nh=4, nt=8, hd=16, dtype=torch.bfloat16)
    nb, layers = 3, range(1, 4)
    part = dataclasses.replace(dims, nl=len(layers))
    device = _device(places)
    full, _ = _operand_views(full_op, dims, nb, places[0 if into_slot else 1])
    slot, _ = _operand_views(slot_op, part, nb, places[1 if into_slot else 0])
    whole_blocks = [random_tensor(dims.block_shape(slot_op.format), dims.dtype) for _ in range(nb)]
    axis = slot_op.format.dim_order.index(BlockDim.LAYER)
    if into_slot:
        fill_random(full, dims.dtype)
        for v in slot:
            v.copy_(poisoned(v.shape, dims.dtype))
        whole_op = dataclasses.replace(slot_op, moved_layers_only=False)
        expected = _converted(full, full_op, whole_blocks, whole_op, dims)
        expected = [b.narrow(axis, layers.start, len(layers)) for b in expected]
        src, src_op, dst, dst_op = full, full_op, slot, slot_op
    else:
        for v, b in zip(slot, whole_blocks, strict=True):
            v.copy_(b.narrow(axis, layers.start, len(layers)))
        for v in full:
            v.copy_(poisoned(v.shape, dims.dtype))
        whole_op = dataclasses.replace(slot_op, moved_layers_only=False)
        expected = _converted(whole_blocks, whole_op, full, full_op, dims)
        src, src_op, dst, dst_op = slot, slot_op, full, full_op
    _permute_layers(src, src_op, dst, dst_op, dims, layers, device, reference)
    if into_slot:
        for got, want in zip(slot, expected, strict=True):
            assert_bits_equal(got.cpu(), want)
        return
    for layer in range(dims.nl):
        got = _layer_parts([v.cpu() for v in full], full_op, dims, layer)
        want = _layer_parts(expected, full_op, dims, layer)
        for g, w in zip(got, want, strict=True):
            assert_bits_equal(g, w if layer in layers else poisoned(g.shape, dims.dtype))


def test_a_stack_cannot_hold_the_moved_layers_only():
    with pytest.raises(InvalidArgumentError, match="moved_layers_only applies to whole blocks"):
        Operand(KvBlockLayout.OperationalNHD, stack=True, moved_layers_only=True)


def test_a_permute_of_some_layers_checks_them():
    dims = KvDims(nl=3, no=2, nh=4, nt=8, hd=16, dtype=torch.bfloat16)
    src, _ = _operand_views(Operand.block_stack(N), dims, 1, "cpu")
    dst, _ = _operand_views(Operand.universal(), dims, 1, "cpu")
    for bad in (range(0), range(2, 4), range(0, 3, 2), [0, 1]):
        with pytest.raises(InvalidArgumentError, match="layers must be"):
            plan_permute(
                [v.data_ptr() for v in src],
                Operand.block_stack(N),
                [v.data_ptr() for v in dst],
                Operand.universal(),
                dims,
                "cpu",
                layers=bad,
            )
    with pytest.raises(LengthMismatchError, match="a positive multiple of 2 addresses"):
        plan_permute(  # a stack's table of every layer where one layer moves
            [v.data_ptr() for v in src][:3],
            Operand.block_stack(N),
            [v.data_ptr() for v in dst],
            Operand.universal(),
            dims,
            "cpu",
            layers=range(1, 2),
        )
