"""Staged transfers (copy engine <-> device slots <-> kernel), their routing and the memory
pool that lends their slots. On a machine without a GPU the same pipeline runs with ``memmove``
and the kernels' CPU paths, piece by piece, so its meaning is checked everywhere; on a GPU the
same tests run it on CUDA streams."""

from dataclasses import replace

import pytest
import torch

from kvblocks.errors import InvalidArgumentError, LayoutFormatError
from kvblocks.kernels.reference import convert
from kvblocks.layout import BlockDim, LayoutConfig, LayoutKind
from kvblocks.storage import PhysicalLayout
from kvblocks.transfer import Strategy, staging
from kvblocks.transfer import strategy as strategy_module
from kvblocks.transfer.executor import Side
from kvblocks.transfer.pools import DeviceMemoryPool
from kvblocks.transfer.strategy import Bounce, RoutePolicy, route

from .helpers import assert_bits_equal
from .test_transfer import CFG, HND, NHD, PP, UNI, block_tensor, shaped

POISON = 0xAB
BIG = replace(CFG, num_blocks=9)
#: The blocks of most staged transfers here: 5 of 9, neither side in order.
S_IDS, D_IDS = [8, 0, 3, 4, 7], [2, 5, 0, 8, 6]


def layout(kind: str, fc: bool | LayoutKind, fmt, cfg: LayoutConfig = BIG) -> PhysicalLayout:
    builder = shaped(PhysicalLayout.builder(cfg).kv_format(fmt), fc)
    return getattr(builder, f"allocate_{kind}")().build()


def fill(physical: PhysicalLayout, value: int | None) -> None:
    """Random bytes (``None``) or ``value`` in every byte of the layout."""
    for allocation in physical.allocations:
        view = allocation.view()
        if value is None:
            view.copy_(torch.randint(0, 256, view.shape, dtype=torch.uint8))
        else:
            view.fill_(value)


def expected_blocks(src: PhysicalLayout, ids, dst_fmt) -> torch.Tensor:
    """The blocks ``ids`` of ``src`` as ``dst_fmt`` stores them, as f16 elements per block."""
    blocks = torch.stack([block_tensor(src, b) for b in ids])
    if not src.kv_format.requires_transform(dst_fmt):
        return blocks
    out = torch.empty_like(blocks)
    convert(blocks, out, CFG.dims(torch.float16), src.kv_format, dst_fmt)
    return out


def poisoned_slots(side: Side, fmt, groups=None) -> staging.SlotLayouts:
    """The slots of the staged transfer of layer ``groups`` (default: all layers at once) of
    ``side``'s blocks, over one buffer whose every byte is ``POISON``, on the GPU if there is
    one."""
    groups = groups or (range(side.config.num_layers),)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    nbytes = staging.slot_bytes(side, groups)
    buffer = torch.full((nbytes,), POISON, dtype=torch.uint8, device=device)
    made: dict[LayoutConfig, PhysicalLayout] = {}

    def slots(config: LayoutConfig) -> PhysicalLayout:
        if config not in made:
            made[config] = staging.slot_layout(config, fmt, buffer)
        return made[config]

    return slots


def run_staged(src: Side, dst: Side, slots: staging.SlotLayouts, groups=None) -> int:
    """The staged pipeline on CUDA streams on a GPU (its copies round three streams), step by
    step without one; returns when it is done, with the number of events it gave back."""
    gpu = torch.cuda.is_available()
    copy_streams = tuple(torch.cuda.Stream() for _ in range(3)) if gpu else ()
    stream = torch.cuda.current_stream() if gpu else None
    events = staging.run_staged(src, dst, slots, stream, copy_streams, groups)
    if gpu:
        torch.cuda.synchronize()
    return len(events)


def counted(monkeypatch, plan_class, measure) -> list:
    """``measure(plan)`` of each plan of ``plan_class`` that runs, in order (they still run)."""
    seen = []
    run = plan_class.run
    monkeypatch.setattr(
        plan_class, "run", lambda plan, **kw: (seen.append(measure(plan)), run(plan, **kw))
    )
    return seen


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of two blocks, so that 5 blocks go in 3 pieces and both slots are reused."""
    monkeypatch.setattr(staging, "PIECE_BYTES", 2 * BIG.block_bytes)


@pytest.mark.parametrize("into_device", [True, False], ids=["h2d", "d2h"])
@pytest.mark.parametrize("formats", [(NHD, NHD), (NHD, HND), (UNI, NHD), (HND, UNI)])
@pytest.mark.parametrize(
    "device_shape",
    [LayoutKind.LAYER_SEPARATE, LayoutKind.OUTER_SEPARATE, LayoutKind.FULLY_CONTIGUOUS],
    ids=["device-regions", "device-k-v-apart", "device-whole"],
)
def test_staged_pieces_land_in_place(small_pieces, into_device, formats, device_shape):
    pinned_fmt, device_fmt = formats
    pinned = layout("pinned", True, pinned_fmt)
    device = layout("device", True if device_fmt == UNI else device_shape, device_fmt)
    src, dst = (pinned, device) if into_device else (device, pinned)
    s_ids, d_ids = [8, 0, 3, 4, 7], [2, 5, 0, 8, 6]
    fill(src, None)
    fill(dst, POISON)
    want = expected_blocks(src, s_ids, dst.kv_format)
    untouched = [b for b in range(BIG.num_blocks) if b not in d_ids]
    before = torch.stack([block_tensor(dst, b) for b in untouched])
    src_side = Side(src, torch.tensor(s_ids), src.kv_format)
    dst_side = Side(dst, torch.tensor(d_ids), dst.kv_format)
    assert staging.blocks_per_piece(src_side) == 2
    assert staging.slot_config(src_side).total_bytes == 4 * BIG.block_bytes  # 2 slots of 2
    run_staged(src_side, dst_side, poisoned_slots(src_side, pinned_fmt))
    got = torch.stack([block_tensor(dst, b) for b in d_ids])
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    after = torch.stack([block_tensor(dst, b) for b in untouched])
    assert torch.equal(after.view(torch.int16), before.view(torch.int16))


@pytest.mark.parametrize("into_device", [True, False], ids=["h2d", "d2h"])
@pytest.mark.parametrize("formats", [(UNI, NHD), (PP, HND), (NHD, HND), (UNI, UNI)])
@pytest.mark.parametrize(
    "device_shape",
    [LayoutKind.LAYER_SEPARATE, LayoutKind.FULLY_CONTIGUOUS],
    ids=["device-regions", "device-whole"],
)
@pytest.mark.parametrize("layers", [range(1, 3), range(0, 1), range(2, 3)], ids=str)
def test_staged_layers_land_in_place(small_pieces, into_device, formats, device_shape, layers):
    """Some layers of each block, through slots that hold those layers only: they land
    converted, the destination's other layers and blocks keep what they held."""
    pinned_fmt, device_fmt = formats
    shape = device_shape if device_fmt.is_operational() else LayoutKind.FULLY_CONTIGUOUS
    src_side, dst_side, before, want = some_layers_case(into_device, pinned_fmt, device_fmt, shape)
    slot_config = staging.slot_config(src_side, layers)
    assert slot_config.num_layers == len(layers)
    per_piece = staging.blocks_per_piece(src_side, layers)
    assert per_piece == min(5, 2 * CFG.num_layers // len(layers))  # pieces of 2 whole blocks
    run_staged(src_side, dst_side, poisoned_slots(src_side, pinned_fmt, [layers]), [layers])
    assert_layers_landed(dst_side.physical, D_IDS, want, before, layers)


def some_layers_case(into_device: bool, pinned_fmt, device_fmt, device_shape: LayoutKind):
    """The sides of a transfer of blocks ``S_IDS`` into ``D_IDS`` between a pinned layout and
    a device one (random source, poisoned destination), what the destination held before (by
    block id) and the blocks it should get (as :func:`expected_blocks` gives them)."""
    pinned = layout("pinned", True, pinned_fmt)
    device = layout("device", device_shape, device_fmt)
    src, dst = (pinned, device) if into_device else (device, pinned)
    fill(src, None)
    fill(dst, POISON)
    before = {b: block_tensor(dst, b) for b in range(BIG.num_blocks)}
    want = expected_blocks(src, S_IDS, dst.kv_format)
    src_side = Side(src, torch.tensor(S_IDS), src.kv_format)
    dst_side = Side(dst, torch.tensor(D_IDS), dst.kv_format)
    return src_side, dst_side, before, want


@pytest.mark.parametrize("into_device", [True, False], ids=["h2d", "d2h"])
@pytest.mark.parametrize("formats", [(UNI, NHD), (PP, HND), (NHD, NHD)])
@pytest.mark.parametrize(
    "groups",
    [
        [range(0, 2), range(2, 3)],  # slots laid out anew for the smaller group
        [range(2, 3), range(0, 1), range(1, 2)],  # one slot layout for all
        [range(1, 2), range(2, 3)],  # layer 0 stays as it was
    ],
    ids=str,
)
def test_staged_layer_groups_land_in_place(small_pieces, into_device, formats, groups):
    """Layer groups one after another through one set of slots: each group's layers land
    converted, the layers of no group and the other blocks keep what they held; one event
    per group on a GPU."""
    pinned_fmt, device_fmt = formats
    case = some_layers_case(into_device, pinned_fmt, device_fmt, LayoutKind.LAYER_SEPARATE)
    src_side, dst_side, before, want = case
    events = run_staged(src_side, dst_side, poisoned_slots(src_side, pinned_fmt, groups), groups)
    assert events == (len(groups) if torch.cuda.is_available() else 0)
    moved = {layer for group in groups for layer in group}
    assert_layers_landed(dst_side.physical, D_IDS, want, before, moved)


@pytest.fixture
def layer_pieces(monkeypatch):
    """Pieces of two blocks' single layer, so that a one-layer group of 5 blocks goes in 3
    pieces, an odd number: the next group's first piece reuses the slot of its last."""
    monkeypatch.setattr(staging, "PIECE_BYTES", 2 * (BIG.block_bytes // BIG.num_layers))


ODD_PIECES = [
    [range(0, 1), range(1, 2), range(2, 3)],  # 3 pieces each, one slot layout
    [range(0, 2), range(2, 3)],  # 5 pieces of one block, then 3 in slots laid out anew
    [range(0, 3)],  # one group of 5 pieces
]


def slot_spans(step) -> list[tuple[int, int]]:
    """The byte ranges of slot memory that a step's blocks go through."""
    physical = step.group.slot.physical
    start, stride = physical.layout.memory[0].addr, physical.layout.block_stride
    ids = step.group.slot.ids[step.first : step.end].tolist()
    return [(start + b * stride, start + (b + 1) * stride) for b in ids]


@pytest.mark.parametrize("into_device", [True, False], ids=["h2d", "d2h"])
@pytest.mark.parametrize("groups", ODD_PIECES, ids=str)
def test_each_step_waits_for_the_last_one_through_its_slot_memory(
    layer_pieces, into_device, groups
):
    """A step's slot memory is free once the step it waits for is done (steps end in
    order): that step is at or after the last one whose slot memory overlaps its own."""
    src, dst, _, _ = some_layers_case(into_device, UNI, NHD, LayoutKind.LAYER_SEPARATE)
    slots = poisoned_slots(src if into_device else dst, UNI, groups)
    steps = staging._steps(src, dst, slots, groups, into_device)
    assert len(steps) == sum(3 if len(g) == 1 else 5 for g in groups)
    for i, step in enumerate(steps):
        spans = slot_spans(step)
        overlapping = [
            k
            for k in range(i)
            if any(a < d and c < b for a, b in spans for c, d in slot_spans(steps[k]))
        ]
        waits_for = max(i - staging._behind(steps, i), -1)  # -1: for nothing
        assert waits_for >= (overlapping[-1] if overlapping else -1), (i, overlapping)
        assert waits_for < i


class Slowed:
    """A plan of a staged step that runs after 20 ms of GPU sleep on its stream."""

    def __init__(self, plan) -> None:
        self._plan = plan

    def run(self, **stream) -> None:
        with torch.cuda.stream(stream.get("stream") or torch.cuda.current_stream()):
            torch.cuda._sleep(40_000_000)
        self._plan.run(**stream)


@pytest.mark.gpu
@pytest.mark.parametrize("into_device", [True, False], ids=["h2d", "d2h"])
@pytest.mark.parametrize("groups", ODD_PIECES, ids=str)
def test_a_slow_last_piece_keeps_its_slot_from_the_next_group(
    layer_pieces, monkeypatch, into_device, groups
):
    """The last piece of each group slowed down (its kernel into the device layout, or its
    copies out to pinned memory): the next group's first piece, through the same slot, still
    waits for it, and every block lands."""
    slowed = "kernel" if into_device else "copies"
    step_work = getattr(staging._Step, slowed)

    def slow_last_piece(step):
        plan = step_work(step)
        return Slowed(plan) if step.end == step.group.slot.ids.numel() else plan

    monkeypatch.setattr(staging._Step, slowed, slow_last_piece)
    src, dst, before, want = some_layers_case(into_device, UNI, NHD, LayoutKind.LAYER_SEPARATE)
    pinned = src if into_device else dst
    run_staged(src, dst, poisoned_slots(pinned, UNI, groups), groups)
    assert_layers_landed(dst.physical, D_IDS, want, before, range(BIG.num_layers))


def test_slots_of_layer_groups():
    """One buffer serves every group: as large as the largest group's slots."""
    pinned = layout("pinned", True, UNI)
    side = Side(pinned, torch.arange(5), UNI)
    groups = [range(0, 2), range(2, 3)]
    largest = staging.slot_config(side, range(0, 2)).total_bytes
    assert staging.slot_bytes(side, groups) == largest
    assert staging.slot_bytes(side, groups[1:]) == staging.slot_config(side, groups[1]).total_bytes
    assert staging.slot_bytes(side, groups[1:]) < largest


@pytest.mark.parametrize(
    ("s_ids", "copies"),
    [([0, 1, 2, 3, 4], [1, 1]), ([4, 3, 2, 1, 0], [1, 1]), ([8, 0, 3, 4, 7], [2, 1])],
)
def test_staged_layers_go_as_rows_of_neighbouring_blocks(small_pieces, monkeypatch, s_ids, copies):
    """Two of three layers of ``UniversalTP`` blocks: ``nh`` rows per block, one pitched copy
    per run of blocks that are neighbours in the pinned layout, taken in the order of their
    ids (pieces of three blocks)."""
    pinned, device = layout("pinned", True, UNI), layout("device", False, NHD)
    fill(pinned, None)
    fill(device, POISON)
    counts = counted(monkeypatch, staging.PitchedCopyPlan, lambda p: (len(p.src), sum(p.heights)))
    layers = range(1, 3)
    src = Side(pinned, torch.tensor(s_ids), UNI)
    dst = Side(device, torch.tensor([2, 5, 0, 8, 6]), NHD)
    run_staged(src, dst, poisoned_slots(src, UNI, [layers]), [layers])
    assert counts == [(n, blocks * CFG.num_heads) for n, blocks in zip(copies, (3, 2), strict=True)]


def assert_layers_landed(dst: PhysicalLayout, d_ids, want, before: dict, layers) -> None:
    """Layers ``layers`` of blocks ``d_ids`` of ``dst`` hold ``want`` (one block per id, as
    :func:`expected_blocks` gives them); every other layer and block holds what ``before``
    says it held."""
    shape = CFG.dims(torch.float16).block_shape(dst.kv_format)
    axis = dst.kv_format.dim_order.index(BlockDim.LAYER)
    for i, b in enumerate(d_ids):
        got = block_tensor(dst, b).view(shape)
        for layer in range(CFG.num_layers):
            expected = want[i] if layer in layers else before[b]
            assert_bits_equal(got.select(axis, layer), expected.view(shape).select(axis, layer))
    for b in set(range(BIG.num_blocks)) - set(d_ids):
        assert_bits_equal(block_tensor(dst, b), before[b])


def test_slot_sizes():
    pinned = layout("pinned", True, NHD)
    one = Side(pinned, torch.tensor([3]), NHD)
    assert staging.blocks_per_piece(one) == 1
    assert staging.slot_config(one).total_bytes == BIG.block_bytes  # one piece: one slot
    every = Side(pinned, torch.arange(9), NHD)
    assert staging.blocks_per_piece(every) == 9  # 9 small blocks fit in one piece
    assert staging.slot_config(every).total_bytes == 9 * BIG.block_bytes


class _OnGpu(Side):
    on_gpu = True
    gpu_reachable = True


class _Pinned(Side):
    on_gpu = False
    gpu_reachable = True


def _side(cls, fc: bool, fmt, n: int = 6) -> Side:
    return cls(layout("pinned", fc, fmt, CFG), torch.arange(n), fmt)


@pytest.mark.parametrize("into_device", [True, False], ids=["h2d", "d2h"])
def test_routes_between_device_and_pinned(monkeypatch, into_device):
    """The routing table, with sides that say they are GPU memory and pinned memory."""
    monkeypatch.setattr(strategy_module, "STAGED_MIN_COPY_BYTES", CFG.block_bytes // 2)
    least = 3 * CFG.block_bytes
    large = RoutePolicy(copy_engine_min_bytes=least, staged_min_bytes=least)

    def strategy(device: Side, pinned: Side, policy=large, layers=None):
        ends = (pinned, device) if into_device else (device, pinned)
        return route(*ends, policy, layers)

    whole, regions = _side(_OnGpu, True, NHD), _side(_OnGpu, False, NHD)
    blocks, universal = _side(_Pinned, True, NHD), _side(_Pinned, True, UNI)
    # By default the kernel, but the copy engine for large transfers of whole pinned blocks:
    # direct where the device side has the same spans, staged through slots in the pinned
    # side's format where it does not (a layer-separate layout, or a format change), each
    # from its own threshold.
    assert strategy(whole, blocks).strategy is Strategy.COPY_ENGINE
    direct_only = RoutePolicy(copy_engine_min_bytes=least)
    assert strategy(whole, blocks, direct_only).strategy is Strategy.COPY_ENGINE
    assert strategy(regions, blocks, direct_only).strategy is Strategy.KERNEL
    staged_only = RoutePolicy(staged_min_bytes=least)
    assert strategy(whole, blocks, staged_only).strategy is Strategy.KERNEL
    assert strategy(regions, blocks, staged_only).strategy is Strategy.STAGED
    kinds = ["copy_engine", "gpu"] if into_device else ["gpu", "copy_engine"]
    for device, fmt in ((regions, NHD), (_side(_OnGpu, False, HND), NHD), (whole, UNI)):
        large_staged = strategy(device, universal if fmt is UNI else blocks)
        assert large_staged.strategy is Strategy.STAGED
        assert [hop[0].value for hop in large_staged.hops] == kinds
        assert large_staged.bounces() == [Bounce("device", fmt)]
    two = (_side(_OnGpu, True, NHD, n=2), _side(_Pinned, True, NHD, n=2))
    assert strategy(*two).strategy is Strategy.KERNEL
    assert strategy(_side(_OnGpu, False, NHD, n=2), two[1]).strategy is Strategy.KERNEL
    assert strategy(whole, blocks, layers=range(1, 3)).strategy is Strategy.KERNEL
    assert strategy(regions, blocks, layers=range(1, 3)).strategy is Strategy.KERNEL
    assert strategy(whole, blocks, RoutePolicy()).strategy is Strategy.KERNEL
    assert strategy(regions, blocks, RoutePolicy()).strategy is Strategy.KERNEL
    pinned_regions = (_side(_Pinned, False, NHD), _side(_Pinned, False, HND))
    assert strategy(regions, pinned_regions[0]).strategy is Strategy.KERNEL
    assert strategy(regions, pinned_regions[1]).strategy is Strategy.KERNEL
    # Preferring the copy engine: direct where both sides have the same spans, else staged
    # through slots in the pinned side's format (whole pinned blocks for a layer-separate
    # device layout, or a format change), whatever the size.
    prefer = RoutePolicy(copy_engine=True)
    staged = strategy(regions, blocks, prefer)
    assert staged.strategy is Strategy.STAGED
    assert [hop[0].value for hop in staged.hops] == kinds
    assert staged.bounces() == [Bounce("device", NHD)]
    assert strategy(*two, prefer).strategy is Strategy.COPY_ENGINE
    assert strategy(whole, universal, prefer).bounces() == [Bounce("device", UNI)]
    assert strategy(whole, blocks, prefer).strategy is Strategy.COPY_ENGINE
    some = strategy(regions, blocks, prefer, range(1, 3))  # regions on both sides
    assert some.strategy is Strategy.COPY_ENGINE
    assert strategy(regions, pinned_regions[0], prefer).strategy is Strategy.COPY_ENGINE
    # Pinned regions in another format: slots take whole pinned blocks only, so the kernel.
    assert strategy(regions, pinned_regions[1], prefer).strategy is Strategy.KERNEL
    # Some layers whose format changes: staged through slots of those layers where the
    # pinned blocks are whole (from the threshold, or preferring the copy engine), else the
    # kernel; 6 blocks of 2 of 3 layers are 4 blocks' bytes, past the threshold of 3.
    for policy in (large, prefer):
        some = strategy(whole, universal, policy, range(1, 3))
        assert some.strategy is Strategy.STAGED
        assert some.bounces() == [Bounce("device", UNI)]
        assert strategy(regions, universal, policy, range(0, 1)).strategy is (
            Strategy.STAGED if policy is prefer else Strategy.KERNEL  # 2 blocks' bytes
        )
    assert strategy(whole, universal, RoutePolicy(), range(1, 3)).strategy is Strategy.KERNEL
    # ... but the kernel where the pinned blocks are so scattered that each copy would move
    # less than STAGED_MIN_COPY_BYTES (one and a half blocks' bytes here). 2 of 3 layers of
    # 6 blocks (4 blocks' bytes) go in 4 copies for 4 runs of neighbouring blocks, in 2 for 2.
    monkeypatch.setattr(strategy_module, "STAGED_MIN_COPY_BYTES", 3 * CFG.block_bytes // 2)
    nine = layout("pinned", True, UNI)
    apart = _Pinned(nine, torch.tensor([0, 2, 4, 6, 8, 3]), UNI)
    assert strategy(whole, apart, large, range(1, 3)).strategy is Strategy.KERNEL
    assert strategy(whole, apart, prefer, range(1, 3)).strategy is Strategy.STAGED
    runs = _Pinned(nine, torch.tensor([7, 0, 8, 1, 2, 6]), UNI)
    assert strategy(whole, runs, large, range(1, 3)).strategy is Strategy.STAGED
    hnd_regions = _side(_OnGpu, False, HND)
    assert strategy(hnd_regions, pinned_regions[0], prefer, range(1, 3)).strategy is (
        Strategy.KERNEL
    )
    # Between two GPU layouts the kernel, whatever the size.
    assert route(whole, regions, large).strategy is Strategy.KERNEL
    assert route(whole, regions, prefer).strategy is Strategy.KERNEL


class _Event:
    """Stands in for a CUDA event: done when the test says so."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


def test_pool_keeps_buffers_in_use_aside():
    pool = DeviceMemoryPool(torch.device("cpu"))
    buffer = pool.acquire(1000)
    event = _Event()
    pool.release_after(buffer, event)
    assert pool.held_bytes == 0
    other = pool.acquire(1000)
    assert other.data_ptr() != buffer.data_ptr()  # still in use: not lent again
    event.done = True
    assert pool.held_bytes == 1000
    again = pool.acquire(500)
    assert again.data_ptr() == buffer.data_ptr()
    pool.release(other)
    with pytest.raises(InvalidArgumentError, match="buffer was not handed out by this pool"):
        pool.release_after(other, _Event())


def test_pool_memo_lives_with_its_buffer():
    pool = DeviceMemoryPool(torch.device("cpu"), release_threshold=1500)
    buffer = pool.acquire(1000)
    made = []

    def make(tag):
        made.append(tag)
        return [tag]

    first = pool.memo(buffer, "a", lambda: make("a"))
    assert pool.memo(buffer, "a", lambda: make("again")) is first
    assert pool.memo(buffer, "b", lambda: make("b")) == ["b"]
    pool.release(buffer)
    again = pool.acquire(800)  # the same buffer, lent again: its memos are still there
    assert again.data_ptr() == buffer.data_ptr()
    assert pool.memo(again, "a", lambda: make("again")) is first
    other = pool.acquire(1000)
    pool.release(other)
    pool.release(again)  # 2000 bytes held: past the threshold, the larger is freed
    kept = pool.acquire(900)
    fresh = pool.memo(kept, "a", lambda: make("fresh"))
    assert made == ["a", "b", "fresh"] and fresh == ["fresh"]
    pool.release(kept)
    with pytest.raises(InvalidArgumentError, match="buffer was not handed out by this pool"):
        pool.memo(kept, "a", lambda: make("never"))


@pytest.mark.parametrize(
    ("s_ids", "d_ids", "copies"),
    [
        ([0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [1, 1, 1]),
        ([4, 3, 2, 1, 0], [4, 5, 6, 7, 8], [1, 1, 1]),
        ([8, 0, 3, 4, 7], [2, 5, 0, 8, 6], [2, 2, 1]),
    ],
)
def test_staged_copies_join_neighbouring_blocks(small_pieces, monkeypatch, s_ids, d_ids, copies):
    """The copy engine moves each run of blocks that are neighbours in both the pinned layout
    and the slot as one copy (pieces of two blocks here): the blocks go in the order of their
    pinned ids, whatever the order they were asked for in."""
    pinned, device = layout("pinned", True, NHD), layout("device", False, NHD)
    fill(pinned, None)
    fill(device, POISON)
    counts = counted(monkeypatch, staging.MemcpyPlan, lambda plan: len(plan.src))
    src, dst = Side(pinned, torch.tensor(s_ids), NHD), Side(device, torch.tensor(d_ids), NHD)
    run_staged(src, dst, poisoned_slots(src, NHD))
    assert counts == copies
    for s, d in zip(s_ids, d_ids, strict=True):
        assert torch.equal(
            block_tensor(device, d).view(torch.int16), block_tensor(pinned, s).view(torch.int16)
        )


@pytest.mark.parametrize("into_device", [True, False], ids=["h2d", "d2h"])
@pytest.mark.parametrize("per_stream", [1, 2, 3, 256])
def test_copies_spread_over_as_many_streams_as_they_need(
    small_pieces, monkeypatch, into_device, per_stream
):
    """Scattered blocks in pieces of two make 5 copies into the GPU (pinned blocks 0, 3 | 4, 7
    | 8) and 4 out of it (0, 2 | 5-6 | 8): ``COPIES_PER_STREAM`` a stream at most, over at
    most the three streams given (on a GPU; without one, no stream), each step's after the
    last one's. The blocks land in place either way."""
    monkeypatch.setattr(staging, "COPIES_PER_STREAM", per_stream)
    pinned, device = layout("pinned", True, NHD), layout("device", False, HND)
    src, dst = (pinned, device) if into_device else (device, pinned)
    fill(src, None)
    fill(dst, POISON)
    want = expected_blocks(src, S_IDS, dst.kv_format)
    run = staging.MemcpyPlan.run
    seen = []

    def spy(plan, **kw):
        seen.append((len(plan.src), kw.get("stream")))
        run(plan, **kw)

    monkeypatch.setattr(staging.MemcpyPlan, "run", spy)
    src_side = Side(src, torch.tensor(S_IDS), src.kv_format)
    dst_side = Side(dst, torch.tensor(D_IDS), dst.kv_format)
    run_staged(src_side, dst_side, poisoned_slots(src_side, NHD))
    copies = [2, 2, 1] if into_device else [2, 1, 1]
    assert [n for n, _ in seen] == copies  # a copy plan per piece
    streams = min(3, -(-sum(copies) // per_stream)) if torch.cuda.is_available() else 1
    assert len({id(stream) for _, stream in seen}) == streams
    got = torch.stack([block_tensor(dst, b) for b in D_IDS])
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def _manager(copy_engine: bool = True):
    from kvblocks.transfer import TransferManager, TransferPreferences

    prefs = TransferPreferences(
        copy_engine=copy_engine, copy_engine_min_bytes=3 * BIG.block_bytes, staged_min_bytes=None
    )
    return TransferManager.builder().preferences(prefs).build()


def _checked_transfer(manager, src, s_ids, dst, d_ids, options=None):
    """Random source, poisoned destination; the transfer's blocks and only those change."""
    sp, dp = manager.layout(src), manager.layout(dst)
    fill(sp, None)
    fill(dp, POISON)
    want = expected_blocks(sp, s_ids, dp.kv_format)
    untouched = [b for b in range(BIG.num_blocks) if b not in d_ids]
    manager.execute_transfer(src, s_ids, dst, d_ids, options).wait(timeout=60)
    got = torch.stack([block_tensor(dp, b) for b in d_ids])
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    for b in untouched:
        assert bool((block_tensor(dp, b).view(torch.uint8) == POISON).all()), b


def _register(manager, kind, fc, fmt):
    return manager.register_layout(layout(kind, fc, fmt))


@pytest.mark.gpu
@pytest.mark.parametrize("formats", [(NHD, NHD), (NHD, HND), (UNI, NHD)])
def test_manager_stages_transfers(small_pieces, formats):
    pinned_fmt, device_fmt = formats
    with _manager() as m:
        pinned = _register(m, "pinned", True, pinned_fmt)
        device = _register(m, "device", False, device_fmt)
        for src, dst in ((pinned, device), (device, pinned)):
            assert m.strategy(src, dst, num_blocks=5) is Strategy.STAGED
            _checked_transfer(m, src, [8, 0, 3, 4, 7], dst, [2, 5, 0, 8, 6])
        assert m.memory_pool.held_bytes >= 4 * BIG.block_bytes  # the slots came back
    with _manager(copy_engine=False) as m:
        pinned = _register(m, "pinned", True, pinned_fmt)
        device = _register(m, "device", False, device_fmt)
        assert m.strategy(pinned, device, num_blocks=5) is Strategy.KERNEL


@pytest.mark.gpu
@pytest.mark.parametrize("formats", [(UNI, NHD), (PP, HND)])
def test_manager_stages_some_layers(small_pieces, formats):
    """A layer range whose format changes, staged through slots of those layers: both ways,
    on the manager's streams; the destination's other layers keep what they held."""
    from kvblocks.transfer import TransferOptions

    pinned_fmt, device_fmt = formats
    layers = range(1, 3)
    with _manager() as m:
        pinned = _register(m, "pinned", True, pinned_fmt)
        device = _register(m, "device", False, device_fmt)
        s_ids, d_ids = [8, 0, 3, 4, 7], [2, 5, 0, 8, 6]
        for src, dst in ((pinned, device), (device, pinned)):
            options = TransferOptions(layer_range=layers)
            assert m.strategy(src, dst, num_blocks=5, options=options) is Strategy.STAGED
            sp, dp = m.layout(src), m.layout(dst)
            fill(sp, None)
            fill(dp, POISON)
            before = {b: block_tensor(dp, b) for b in range(BIG.num_blocks)}
            want = expected_blocks(sp, s_ids, dp.kv_format)
            m.execute_transfer(src, s_ids, dst, d_ids, options).wait(timeout=60)
            assert_layers_landed(dp, d_ids, want, before, layers)


@pytest.mark.gpu
@pytest.mark.parametrize("formats", [(UNI, NHD), (PP, HND)])
def test_manager_stages_layer_groups(small_pieces, formats):
    """Layer groups staged through one set of slots, both ways, on the caller's stream: an
    event per group, after the work queued before on that stream. Each way runs once first,
    so that compiling its kernels (longer than the sleep) is not what the sleep hides."""
    from kvblocks.transfer import TransferOptions

    pinned_fmt, device_fmt = formats
    groups = [range(0, 2), range(2, 3)]
    with _manager() as m:
        pinned = _register(m, "pinned", True, pinned_fmt)
        device = _register(m, "device", False, device_fmt)
        s_ids, d_ids = [8, 0, 3, 4, 7], [2, 5, 0, 8, 6]
        for src, dst in ((pinned, device), (device, pinned)):
            sp, dp = m.layout(src), m.layout(dst)
            fill(sp, None)
            fill(dp, POISON)
            before = {b: block_tensor(dp, b) for b in range(BIG.num_blocks)}
            want = expected_blocks(sp, s_ids, dp.kv_format)
            for notification in m.execute_layer_groups(src, s_ids, dst, d_ids, groups):
                notification.wait(timeout=60)
            fill(dp, POISON)
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                torch.cuda._sleep(20_000_000)
                options = TransferOptions(cuda_stream=stream)
                done = m.execute_layer_groups(src, s_ids, dst, d_ids, groups, options)
            assert len(done) == 2 and not done[0].poll()  # behind the sleep
            for notification in done:
                notification.wait(timeout=60)
            assert_layers_landed(dp, d_ids, want, before, range(3))
        slots = staging.slot_bytes(Side(m.layout(pinned), torch.arange(5), pinned_fmt), groups)
        assert m.memory_pool.held_bytes >= slots  # the slots came back


@pytest.mark.gpu
def test_layer_groups_of_different_routes_go_in_order_on_one_stream(small_pieces, monkeypatch):
    """Two layers staged, then one by the kernel (a threshold between their sizes), without a
    caller's stream: both on one pool stream, after the work queued before on the current
    stream."""
    from kvblocks.transfer import TransferManager, TransferOptions, TransferPreferences

    monkeypatch.setattr(strategy_module, "STAGED_MIN_COPY_BYTES", 0)
    s_ids, d_ids = [8, 0, 3, 4, 7], [2, 5, 0, 8, 6]
    groups = [range(0, 2), range(2, 3)]
    layer_bytes = BIG.block_bytes // BIG.num_layers
    prefs = TransferPreferences(
        copy_engine=False, copy_engine_min_bytes=None, staged_min_bytes=2 * 5 * layer_bytes
    )
    with TransferManager.builder().preferences(prefs).build() as m:
        pinned = _register(m, "pinned", True, UNI)
        device = _register(m, "device", False, NHD)
        routes = [
            m.strategy(pinned, device, num_blocks=5, options=TransferOptions(layer_range=g))
            for g in groups
        ]
        assert routes == [Strategy.STAGED, Strategy.KERNEL]
        streams = []
        run_on_stream = m._runner.on_stream
        monkeypatch.setattr(
            m._runner,
            "on_stream",
            lambda plan, g, options, *rest, **kw: (
                streams.append(options.cuda_stream),
                run_on_stream(plan, g, options, *rest, **kw),
            )[1],
        )
        sp, dp = m.layout(pinned), m.layout(device)
        fill(sp, None)
        fill(dp, POISON)
        want = expected_blocks(sp, s_ids, dp.kv_format)
        torch.cuda._sleep(20_000_000)
        fill(dp, 0)  # on the current stream, well after the call returns
        done = m.execute_layer_groups(pinned, s_ids, device, d_ids, groups)
        for notification in done:
            notification.wait(timeout=60)
        torch.cuda.synchronize()
        zeros = {b: torch.zeros_like(block_tensor(dp, b)) for b in range(BIG.num_blocks)}
        assert_layers_landed(dp, d_ids, want, zeros, range(3))
        assert len(streams) == 2 and streams[0] is streams[1] is not None


@pytest.mark.gpu
def test_staged_transfers_in_both_directions_at_once(small_pieces):
    """Staged transfers queued together on the pool's streams, each through its own slots."""
    with _manager() as m:
        ids = list(range(BIG.num_blocks))
        moves = []  # (src, dst) handles: 4 into the GPU and 4 out of it
        for _ in range(4):
            moves.append((_register(m, "pinned", True, NHD), _register(m, "device", False, HND)))
            moves.append((_register(m, "device", False, HND), _register(m, "pinned", True, NHD)))
        wanted = []
        for src, dst in moves:
            fill(m.layout(src), None)
            fill(m.layout(dst), POISON)
            wanted.append(expected_blocks(m.layout(src), ids, m.layout(dst).kv_format))
        notes = [m.execute_transfer(src, ids, dst, ids[::-1]) for src, dst in moves]
        for note in notes:
            note.wait(timeout=60)
        for (_, dst), want in zip(moves, wanted, strict=True):
            got = torch.stack([block_tensor(m.layout(dst), b) for b in ids[::-1]])
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.gpu
def test_staged_transfers_follow_the_callers_stream(small_pieces):
    from kvblocks.transfer import TransferOptions

    with _manager() as m:
        pinned = _register(m, "pinned", True, HND)
        device = _register(m, "device", False, NHD)
        ids = [0, 1, 2, 3, 4]
        assert m.strategy(device, pinned, num_blocks=len(ids)) is Strategy.STAGED
        torch.cuda._sleep(20_000_000)  # the fill below lands well after the call returns
        fill(m.layout(device), 7)
        m.execute_transfer(device, ids, pinned, ids).wait(timeout=60)
        for b in ids:
            assert bool((block_tensor(m.layout(pinned), b).view(torch.uint8) == 7).all())
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            torch.cuda._sleep(20_000_000)
            fill(m.layout(device), 9)
            note = m.execute_transfer(device, ids, pinned, ids, TransferOptions(cuda_stream=stream))
        assert note.poll()  # the caller owns synchronization
        stream.synchronize()
        for b in ids:
            assert bool((block_tensor(m.layout(pinned), b).view(torch.uint8) == 9).all())


def test_staging_needs_whole_pinned_blocks():
    pinned, device = layout("pinned", False, NHD), layout("device", False, NHD)
    fill(device, POISON)
    src = Side(pinned, torch.tensor([0, 1]), NHD)
    with pytest.raises(LayoutFormatError, match="src must be fully contiguous to be staged"):
        run_staged(src, Side(device, torch.tensor([2, 3]), NHD), poisoned_slots(src, NHD))
    assert all(bool((a.view() == POISON).all()) for a in device.allocations)
