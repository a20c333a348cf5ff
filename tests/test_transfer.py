"""TransferManager: every storage pair, random block maps, layer ranges and format changes,
verified by checksums (and by bytes against the torch reference for format changes)."""

import asyncio
import os
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvblocks.errors import (
    BackendUnavailableError,
    BlockIdOutOfRangeError,
    ConfigMismatchError,
    InvalidArgumentError,
    LayoutFormatError,
    LayoutReleasedError,
    LengthMismatchError,
    OverlapError,
    SerializationError,
    TransferError,
)
from kvblocks.kernels.reference import convert
from kvblocks.layout import BlockDim, KvBlockLayout, LayoutConfig, LayoutKind
from kvblocks.storage import PhysicalLayout, StorageKind
from kvblocks.transfer import (
    BounceBuffer,
    FillPattern,
    LayoutHandle,
    LogicalLayoutHandle,
    SerializedLayout,
    Strategy,
    TransferCompleteNotification,
    TransferManager,
    TransferOptions,
    TransferPreferences,
    block_checksums,
    block_checksums_as,
    fill_blocks,
    layer_checksums,
)
from kvblocks.transfer.pools import DeviceMemoryPool
from kvblocks.transfer.verify import read_bytes
from tests.helpers import assert_bits_equal

NHD, HND, UNI, PP = (
    KvBlockLayout.OperationalNHD,
    KvBlockLayout.OperationalHND,
    KvBlockLayout.UniversalTP,
    KvBlockLayout.UniversalPP,
)
CFG = LayoutConfig(
    num_blocks=6,
    num_layers=3,
    outer_dim=2,
    page_size=4,
    inner_dim=16,
    dtype_width_bytes=2,
    num_heads=2,
)
KINDS = ["device", "pinned", "system", "disk"]
POISON = 0xAB


@pytest.fixture(scope="module")
def manager():
    with TransferManager.builder().worker_id(7).build() as m:
        yield m


def shaped(builder, fc: bool | LayoutKind):
    """``builder`` set to a fully contiguous layout (``fc`` True), a layer-separate one (False),
    or the :class:`LayoutKind` ``fc`` names."""
    if not isinstance(fc, LayoutKind):
        fc = LayoutKind.FULLY_CONTIGUOUS if fc else LayoutKind.LAYER_SEPARATE
    return builder.of_kind(fc)


def make(manager, kind, fc: bool | LayoutKind = True, fmt=NHD, cfg=CFG, folder=None):
    """Register a new layout of ``cfg`` in ``kind`` memory, shaped as :func:`shaped` says."""
    builder = shaped(PhysicalLayout.builder(cfg).kv_format(fmt), fc)
    if kind == "disk":
        folder = folder or tempfile.mkdtemp()
        builder = builder.allocate_disk(os.path.join(folder, f"{os.urandom(4).hex()}.bin"))
    else:
        builder = getattr(builder, f"allocate_{kind}")()
    return manager.register_layout(builder.build())


def block_tensor(physical, block_id) -> torch.Tensor:
    """A block's bytes as stored (regions in (layer, outer) order), as f16 elements."""
    layout = physical.layout
    if layout.is_fully_contiguous:
        raw = read_bytes(physical, layout.block_region(block_id))
    else:
        nl, no = layout.config.num_layers, layout.config.outer_dim
        raw = b"".join(
            read_bytes(physical, layout.region(block_id, l, o))
            for l in range(nl)
            for o in range(no)
        )
    return torch.frombuffer(bytearray(raw), dtype=torch.float16)


def check_transfer(manager, src, s_ids, dst, d_ids, layers, options=None, peers=None):
    """Run a transfer and check every byte it should and should not have written.

    ``peers`` maps handles of remote layouts to the layouts behind them (in this process)."""
    peers = peers or {}
    sp = peers[src] if src in peers else manager.layout(src)
    dp = peers[dst] if dst in peers else manager.layout(dst)
    fill_blocks(sp, range(sp.config.num_blocks), FillPattern.sequential())
    fill_blocks(dp, range(dp.config.num_blocks), FillPattern.of_constant(POISON))
    before = layer_checksums(dp, range(dp.config.num_blocks)) if not _universal(dp) else None
    whole_before = block_checksums(dp, range(dp.config.num_blocks))
    manager.execute_transfer(src, s_ids, dst, d_ids, options).wait(timeout=60)

    untouched = [b for b in range(dp.config.num_blocks) if b not in d_ids]
    assert block_checksums(dp, untouched) == [whole_before[b] for b in untouched]
    s_fmt = (options and options.src_kv_layout) or sp.kv_format
    d_fmt = (options and options.dst_kv_layout) or dp.kv_format
    if s_fmt.requires_transform(d_fmt):
        dims = CFG.dims(torch.float16)
        src_blocks = torch.stack([block_tensor(sp, b) for b in s_ids])
        expected = torch.empty_like(src_blocks)
        convert(src_blocks, expected, dims, s_fmt, d_fmt)
        got = torch.stack([block_tensor(dp, b) for b in d_ids])
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
        return
    if layers is None or _universal(sp) or _universal(dp):
        assert block_checksums(dp, d_ids) == block_checksums(sp, s_ids)
        return
    moved = layer_checksums(dp, d_ids)
    wanted = layer_checksums(sp, s_ids)
    for i, b in enumerate(d_ids):
        for l in range(dp.config.num_layers):
            expect = wanted[i][l] if l in layers else before[b][l]
            assert moved[i][l] == expect, (b, l)


def draw_blocks(data, formats):
    """Source ids of CFG's 6 blocks (repeats allowed), as many distinct destination ids, and a
    layer range where the formats allow one (a copy, no universal side), else None."""
    s_fmt, d_fmt = formats
    n = data.draw(st.integers(1, 4))
    s_ids = data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    d_ids = data.draw(st.permutations(range(6)))[:n]
    layers = None
    if not s_fmt.requires_transform(d_fmt) and UNI not in formats:
        start = data.draw(st.integers(0, 2))
        layers = range(start, data.draw(st.integers(start + 1, 3)))
    return s_ids, d_ids, layers


def _universal(physical):
    return physical.kv_format.dim_order is not None and not physical.kv_format.is_operational()


FORMAT_PAIRS = [
    (NHD, NHD),
    (NHD, HND),
    (HND, NHD),
    (NHD, UNI),
    (UNI, HND),
    (KvBlockLayout.Unknown, KvBlockLayout.Unknown),
]


@settings(max_examples=50)
@given(
    src_kind=st.sampled_from(KINDS),
    dst_kind=st.sampled_from(KINDS),
    src_fc=st.sampled_from(LayoutKind),
    dst_fc=st.sampled_from(LayoutKind),
    formats=st.sampled_from(FORMAT_PAIRS),
    data=st.data(),
)
def test_every_storage_pair(manager, src_kind, dst_kind, src_fc, dst_fc, formats, data):
    s_fmt, d_fmt = formats
    if s_fmt == UNI:  # a universal block is one contiguous span
        src_fc = LayoutKind.FULLY_CONTIGUOUS
    if d_fmt == UNI:
        dst_fc = LayoutKind.FULLY_CONTIGUOUS
    s_ids, d_ids, layers = draw_blocks(data, formats)
    src = make(manager, src_kind, src_fc, s_fmt)
    dst = make(manager, dst_kind, dst_fc, d_fmt)
    try:
        check_transfer(manager, src, s_ids, dst, d_ids, layers, TransferOptions(layer_range=layers))
    finally:
        manager.release_layout(src)
        manager.release_layout(dst)


@settings(max_examples=40)
@given(
    src_kind=st.sampled_from(["device", "pinned", "system"]),
    dst_kind=st.sampled_from(["device", "pinned", "system"]),
    src_fc=st.sampled_from(LayoutKind),
    dst_fc=st.sampled_from(LayoutKind),
    formats=st.sampled_from([(NHD, HND), (HND, NHD), (NHD, UNI), (UNI, HND), (PP, UNI)]),
    data=st.data(),
)
def test_some_layers_change_format_on_the_way(
    manager, src_kind, dst_kind, src_fc, dst_fc, formats, data
):
    """A layer range with a format change moves those layers of each block, converted, and
    leaves the destination's other layers as they were."""
    s_fmt, d_fmt = formats
    if not s_fmt.is_operational():
        src_fc = LayoutKind.FULLY_CONTIGUOUS
    if not d_fmt.is_operational():
        dst_fc = LayoutKind.FULLY_CONTIGUOUS
    s_ids, d_ids, _ = draw_blocks(data, formats)
    nl = CFG.num_layers
    start = data.draw(st.integers(0, nl - 1))
    layers = range(start, data.draw(st.integers(start + 1, nl)))
    src = make(manager, src_kind, src_fc, s_fmt)
    dst = make(manager, dst_kind, dst_fc, d_fmt)
    try:
        sp, dp = manager.layout(src), manager.layout(dst)
        fill_blocks(sp, range(6), FillPattern.sequential())
        fill_blocks(dp, range(6), FillPattern.of_constant(POISON))
        before = {b: block_tensor(dp, b) for b in range(6)}
        options = TransferOptions(layer_range=layers)
        bounced = torch.cuda.is_available() and {src_kind, dst_kind} == {"system", "device"}
        if bounced and len(layers) < nl:
            with pytest.raises(InvalidArgumentError, match="through pinned_bounce"):
                manager.execute_transfer(src, s_ids, dst, d_ids, options)
            for b in range(6):  # refused before anything moved
                assert_bits_equal(block_tensor(dp, b), before[b])
            return
        manager.execute_transfer(src, s_ids, dst, d_ids, options).wait(timeout=60)
        assert_layers_moved(sp, s_ids, dp, d_ids, before, layers)
    finally:
        manager.release_layout(src)
        manager.release_layout(dst)


def assert_layers_moved(sp, s_ids, dp, d_ids, before: dict, layers) -> None:
    """Layers ``layers`` of blocks ``s_ids`` of ``sp`` are in blocks ``d_ids`` of ``dp``, in
    its format; every other layer and block of ``dp`` holds what ``before`` (block id ->
    :func:`block_tensor`) says it held."""
    s_fmt, d_fmt = sp.kv_format, dp.kv_format
    dims = CFG.dims(torch.float16)
    expected = torch.empty(len(s_ids), dims.block_elems, dtype=torch.float16)
    convert(torch.stack([block_tensor(sp, b) for b in s_ids]), expected, dims, s_fmt, d_fmt)
    axis = d_fmt.dim_order.index(BlockDim.LAYER)
    shape = dims.block_shape(d_fmt)
    for i, b in enumerate(d_ids):
        got = block_tensor(dp, b).view(shape)
        for layer in range(CFG.num_layers):
            want = expected[i].view(shape) if layer in layers else before[b].view(shape)
            assert_bits_equal(got.select(axis, layer), want.select(axis, layer))
    for b in set(range(dp.config.num_blocks)) - set(d_ids):
        assert_bits_equal(block_tensor(dp, b), before[b])


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (("pinned", True, UNI), ("device", False, NHD)),
        (("device", False, HND), ("pinned", True, PP)),
        (("system", True, NHD), ("disk", False, NHD)),
    ],
    ids=["into-device", "out-of-device", "to-disk"],
)
@pytest.mark.parametrize(
    "groups", [[range(0, 2), range(2, 3)], [range(2, 3), range(1, 2)], [range(1, 2)]], ids=str
)
def test_layer_groups_land_in_place(manager, src, dst, groups):
    """A transfer in layer groups: every group's layers land (converted where the formats
    differ), the layers of no group and the other blocks keep what they held, and there is a
    notification per group."""
    src_h, dst_h = make(manager, *src), make(manager, *dst)
    try:
        sp, dp = manager.layout(src_h), manager.layout(dst_h)
        fill_blocks(sp, range(6), FillPattern.sequential())
        fill_blocks(dp, range(6), FillPattern.of_constant(POISON))
        before = {b: block_tensor(dp, b) for b in range(6)}
        s_ids, d_ids = [4, 0, 5, 2], [1, 3, 0, 5]
        done = manager.execute_layer_groups(src_h, s_ids, dst_h, d_ids, groups)
        assert len(done) == len(groups)
        for notification in done:
            notification.wait(timeout=60)
        assert_layers_moved(sp, s_ids, dp, d_ids, before, {l for g in groups for l in g})
    finally:
        manager.release_layout(src_h)
        manager.release_layout(dst_h)


def test_layer_group_errors_move_nothing(manager):
    a = make(manager, "pinned", True, UNI)
    b = make(manager, "device", False, NHD)
    on_disk = make(manager, "disk", True, NHD)
    fill_blocks(manager.layout(b), range(6), FillPattern.of_constant(POISON))
    before = block_checksums(manager.layout(b), range(6))
    run = manager.execute_layer_groups
    two = [range(0, 2), range(2, 3)]
    bounce = BounceBuffer.from_handle(make(manager, "pinned", True, UNI), [0])
    cases = [
        (
            lambda: run(a, [0], b, [0], two, TransferOptions(layer_range=range(1))),
            "options.layer_range must be None for a transfer in layer groups: groups gives",
        ),
        (
            lambda: run(a, [0], b, [0], two, TransferOptions(bounce_buffer=bounce)),
            "options.bounce_buffer must be None",
        ),
        (
            lambda: run(a, [0], b, [0], two, TransferOptions(nixl_write_notification=b"x")),
            "options.nixl_write_notification must be None",
        ),
        (lambda: run(a, [0], b, [0], []), "groups must be a non-empty sequence of ranges"),
        (lambda: run(a, [0], b, [0], range(3)), "groups must be a non-empty sequence"),
        (lambda: run(a, [0], b, [0], [range(0, 1), range(2, 4)]), r"groups\[1\] must be a non"),
        (lambda: run(a, [0], b, [0], [range(0, 3, 2)]), r"groups\[0\] must be a range with"),
        (lambda: run(a, [0], b, [6], two), r"dst_ids must be in \[0, 6\), got 6"),
        (
            lambda: run(a, [0], on_disk, [0], two),
            r"groups\[0\] must cover every layer when the block format changes",
        ),
    ]
    for call, match in cases:
        with pytest.raises(InvalidArgumentError, match=match):
            call()
    assert block_checksums(manager.layout(b), range(6)) == before
    assert all(n.poll() for n in run(a, [], b, [], two))


def check_transfers_from_threads(manager, kinds, formats, num_blocks, threads, folder=None):
    """Calls issued from ``threads`` threads at once, a block each (and some of three blocks),
    from a layer-separate ``kinds[0]`` layout into a fully contiguous ``kinds[1]`` one, each land
    their blocks where they said, in the destination's format."""
    cfg = replace(CFG, num_blocks=num_blocks)
    src = make(manager, kinds[0], False, formats[0], cfg, folder)
    dst = make(manager, kinds[1], True, formats[1], cfg, folder)
    sp, dp = manager.layout(src), manager.layout(dst)
    fill_blocks(sp, range(num_blocks), FillPattern.sequential())
    fill_blocks(dp, range(num_blocks), FillPattern.of_constant(POISON))
    target = torch.randperm(num_blocks).tolist()  # source block b goes to block target[b]
    start = threading.Barrier(threads)

    def issue(k: int) -> None:
        mine, calls = list(range(k, num_blocks, threads)), []
        while mine:  # calls of 1 and 3 blocks in turn
            size = 3 if len(calls) % 2 else 1
            calls.append(mine[:size])
            mine = mine[size:]
        start.wait()
        notes = [manager.execute_transfer(src, c, dst, [target[b] for b in c]) for c in calls]
        for note in notes:
            note.wait(timeout=60)

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(issue, range(threads)))
        moved = block_checksums(dp, target)
        assert moved == block_checksums_as(sp, range(num_blocks), dp.kv_format)
    finally:
        manager.release_layout(src)
        manager.release_layout(dst)


@pytest.mark.parametrize(
    "kinds, formats",
    [
        (("pinned", "device"), (NHD, NHD)),
        (("device", "system"), (NHD, HND)),
        (("system", "disk"), (NHD, NHD)),
    ],
    ids=["pinned-device", "device-system-permute", "system-disk"],
)
def test_transfers_from_many_threads(manager, kinds, formats, tmp_path):
    check_transfers_from_threads(manager, kinds, formats, 48, 4, str(tmp_path))


def test_direct_disk_io_with_page_sized_regions(manager, tmp_path):
    cfg = LayoutConfig(
        num_blocks=8,
        num_layers=2,
        outer_dim=2,
        page_size=16,
        inner_dim=128,
        dtype_width_bytes=2,
        num_heads=1,
    )  # 4 KiB regions
    host = make(manager, "pinned", True, cfg=cfg)
    disk = make(manager, "disk", True, cfg=cfg, folder=str(tmp_path))
    assert manager.layout(disk).file.direct in (True, False)
    hp, dp = manager.layout(host), manager.layout(disk)
    fill_blocks(hp, range(8), FillPattern.sequential())
    manager.execute_transfer(host, [0, 1, 2, 7], disk, [4, 5, 6, 0]).wait()
    assert block_checksums(dp, [4, 5, 6, 0]) == block_checksums(hp, [0, 1, 2, 7])
    back = make(manager, "system", False, cfg=cfg)
    manager.execute_transfer(disk, [4, 5, 6, 0], back, [1, 2, 3, 4]).wait()
    assert block_checksums(manager.layout(back), [1, 2, 3, 4]) == block_checksums(hp, [0, 1, 2, 7])


def test_format_override_and_bounce_buffer(manager, tmp_path):
    src = make(manager, "system", True, KvBlockLayout.Unknown)
    dst = make(manager, "disk", True, UNI, folder=str(tmp_path))
    bounce = make(manager, "pinned", True, KvBlockLayout.Unknown)
    options = TransferOptions(
        src_kv_layout=HND, bounce_buffer=BounceBuffer.from_handle(bounce, [3, 4])
    )
    assert manager.strategy(src, dst, options) is Strategy.DISK_BOUNCE
    check_transfer(manager, src, [0, 1], dst, [2, 3], None, options)


def test_strategies_on_this_machine(manager, tmp_path):
    h = {k: make(manager, k, True) for k in KINDS[:3]}
    h["disk"] = make(manager, "disk", True, folder=str(tmp_path))
    gpu = torch.cuda.is_available()
    assert manager.strategy(h["device"], h["pinned"]) is (
        Strategy.KERNEL if gpu else Strategy.HOST_COPY
    )
    assert manager.strategy(h["device"], h["system"]) is (
        Strategy.PINNED_BOUNCE if gpu else Strategy.HOST_COPY
    )
    assert manager.strategy(h["pinned"], h["system"]) is Strategy.HOST_COPY
    assert manager.strategy(h["system"], h["disk"]) is Strategy.DISK_IO
    assert manager.strategy(h["device"], h["disk"]) is (
        Strategy.DISK_BOUNCE if gpu else Strategy.DISK_IO
    )
    assert manager.strategy(h["disk"], h["disk"]) is Strategy.DISK_BOUNCE
    every = CFG.num_blocks
    assert manager.strategy(h["device"], h["pinned"], num_blocks=every) is (
        Strategy.KERNEL if gpu else Strategy.HOST_COPY  # 6 blocks are fewer than 16 MiB
    )
    with pytest.raises(InvalidArgumentError, match="num_blocks must be a positive int"):
        manager.strategy(h["device"], h["pinned"], num_blocks=0)


@pytest.mark.parametrize("name", ["copy_engine_min_bytes", "staged_min_bytes"])
@pytest.mark.parametrize("value", [-1, 1.5, "16"])
def test_copy_engine_thresholds_are_checked(name, value):
    prefs = TransferPreferences(**{name: value})
    with pytest.raises(InvalidArgumentError, match=f"preferences.{name} must be an int >= 0"):
        TransferManager.builder().preferences(prefs).build()


def test_argument_errors_move_nothing(manager):
    a = make(manager, "system", True, NHD)
    b = make(manager, "system", False, NHD)
    other = make(
        manager,
        "system",
        True,
        NHD,
        cfg=LayoutConfig(
            num_blocks=6, num_layers=4, outer_dim=2, page_size=4, inner_dim=16, dtype_width_bytes=2
        ),
    )
    unknown = make(manager, "system", True, KvBlockLayout.Unknown)
    no_heads = make(
        manager,
        "system",
        True,
        HND,
        cfg=LayoutConfig(
            num_blocks=6, num_layers=3, outer_dim=2, page_size=4, inner_dim=16, dtype_width_bytes=2
        ),
    )
    on_disk = make(manager, "disk", True, NHD)
    fill_blocks(manager.layout(b), range(6), FillPattern.of_constant(POISON))
    before = block_checksums(manager.layout(b), range(6))
    run = manager.execute_transfer
    cases = [
        (lambda: run(LayoutHandle(7, 999), [0], b, [0]), InvalidArgumentError, "is not registered"),
        (lambda: run(a, [0, 1], b, [0]), LengthMismatchError, "dst_ids must hold as many ids"),
        (
            lambda: run(a, [6], b, [0]),
            BlockIdOutOfRangeError,
            r"src_ids must be in \[0, 6\), got 6",
        ),
        (lambda: run(a, [0], b, [-1]), BlockIdOutOfRangeError, "dst_ids"),
        (lambda: run(a, [0, 1], b, [2, 2]), OverlapError, "names block 2 twice"),
        (lambda: run(b, [0, 1], b, [1, 2]), OverlapError, "block 1 is also a source"),
        (
            lambda: run(a, [0], other, [0]),
            ConfigMismatchError,
            "num_layers=4 where the source has 3",
        ),
        (lambda: run(unknown, [0], b, [0]), LayoutFormatError, "is Unknown"),
        (lambda: run(no_heads, [0], b, [0]), InvalidArgumentError, "num_heads must be set"),
        (
            lambda: run(
                a, [0], on_disk, [0], TransferOptions(layer_range=range(1, 2), dst_kv_layout=HND)
            ),
            InvalidArgumentError,
            "layer_range must cover every layer when the block format changes on the way",
        ),
        (
            lambda: run(a, [0], b, [0], TransferOptions(layer_range=range(2, 5))),
            BlockIdOutOfRangeError,
            "layers must be a non-empty range",
        ),
        (
            lambda: run(a, [0], b, [0], TransferOptions(dst_kv_layout=UNI)),
            LayoutFormatError,
            "must be operational for a layer-separate layout",
        ),
        (lambda: run(a, [0.5], b, [0]), InvalidArgumentError, "src_ids must hold ints"),
        (lambda: run(a, [0], b, [0], {"layer_range": 1}), InvalidArgumentError, "options must be"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    assert block_checksums(manager.layout(b), range(6)) == before
    assert manager.execute_transfer(a, [], b, []).poll()


def test_released_layout(manager):
    a = make(manager, "system")
    b = make(manager, "system")
    manager.layout(b).release()
    with pytest.raises(LayoutReleasedError, match="released"):
        manager.execute_transfer(a, [0], b, [0])


def test_failed_transfer_completes_with_error(manager, tmp_path):
    disk = make(manager, "disk", True, folder=str(tmp_path))
    host = make(manager, "system", True)
    hp = manager.layout(host)
    fill_blocks(hp, range(6), FillPattern.of_constant(POISON))
    before = block_checksums(hp, range(6))
    os.truncate(manager.layout(disk).file.path, CFG.block_bytes)  # blocks 1.. are gone
    note = manager.execute_transfer(disk, [3, 4], host, [0, 1])
    with pytest.raises(TransferError, match="disk_io transfer failed: .*file ends before byte"):
        note.wait()
    assert note.poll() and isinstance(note.exception(), TransferError)
    assert block_checksums(hp, range(2, 6)) == before[2:]


@pytest.mark.parametrize(
    "shape", [LayoutKind.LAYER_SEPARATE, LayoutKind.OUTER_SEPARATE], ids=lambda k: k.value
)
def test_remote_layouts(manager, shape):
    src = make(manager, "system", shape, HND)
    blob = manager.export_layout(src).to_bytes()
    remote = manager.import_layout(SerializedLayout.from_bytes(blob))
    assert manager.layout(remote).storage is StorageKind.REMOTE
    imported, local = manager.layout(remote).layout, manager.layout(src).layout
    assert imported.kind is shape
    assert imported.region_table([3, 0, 5]) == local.region_table([3, 0, 5])
    assert remote.worker_id == 7
    with pytest.raises(BackendUnavailableError, match="NIXL"):
        manager.execute_transfer(src, [0], remote, [0])
    descriptor = manager.build_logical_descriptor(src, LogicalLayoutHandle.G2)
    assert descriptor.tier is LogicalLayoutHandle.G2 and descriptor.handle == src
    manager.release_layout(remote)
    manager.release_layout(src)


def test_tiers_resolve_on_this_worker_and_on_importers():
    G1, G2, G4 = LogicalLayoutHandle.G1, LogicalLayoutHandle.G2, LogicalLayoutHandle.G4
    with (
        TransferManager.builder().worker_id(1).build() as a,
        TransferManager.builder().worker_id(2).build() as b,
    ):
        g1, other = make(a, "device", True), make(a, "system", True)
        assert a.build_logical_descriptor(g1, G1).handle == g1
        assert a.resolve(1, G1) == g1
        g2 = make(b, "pinned", True)
        b.build_logical_descriptor(g2, G2)
        described = SerializedLayout.from_bytes(b.export_layout(g2).to_bytes())
        assert described.tier is G2
        first = a.import_layout(described)
        assert a.resolve(2, G2) == first
        again = a.import_layout(described)  # a newer import replaces the older
        assert a.resolve(2, G2) == again
        with pytest.raises(InvalidArgumentError, match="no layout of worker 2 serving G1"):
            a.resolve(2, G1)
        with pytest.raises(InvalidArgumentError, match="tier G1 is served by"):
            a.build_logical_descriptor(other, G1)
        with pytest.raises(InvalidArgumentError, match="serves G1 already"):
            a.build_logical_descriptor(g1, G2)
        with pytest.raises(InvalidArgumentError, match="another worker's layout"):
            a.build_logical_descriptor(again, G4)
        a.release_layout(g1)
        with pytest.raises(InvalidArgumentError, match="no layout of worker 1 serving G1"):
            a.resolve(1, G1)
        assert a.build_logical_descriptor(other, G1).handle == other


def test_serialized_layout_round_trip_and_versions(manager):
    handle = make(manager, "pinned", True, KvBlockLayout.Custom(list(reversed(HND.dim_order))))
    described = manager.export_layout(handle)
    again = SerializedLayout.from_bytes(described.to_bytes())
    assert again == described
    assert again.worker == manager.address
    with pytest.raises(SerializationError, match="version 1; this kvblocks reads version 2"):
        SerializedLayout.from_bytes(described.to_bytes().replace(b'"version":2', b'"version":1'))
    with pytest.raises(SerializationError, match="no KVBL header"):
        SerializedLayout.from_bytes(b"{}")
    with pytest.raises(SerializationError, match="damaged"):
        SerializedLayout.from_bytes(described.to_bytes()[:40])


def test_layout_handles():
    h = LayoutHandle(0xDEADBEEF, 42)
    assert LayoutHandle.from_packed(h.packed) == h and h.packed >> 64 == 0xDEADBEEF
    with pytest.raises(InvalidArgumentError, match="worker_id must be an int"):
        LayoutHandle(-1, 0)
    with pytest.raises(InvalidArgumentError, match="value must be an int in"):
        LayoutHandle.from_packed(1 << 128)


def test_registration(manager):
    physical = PhysicalLayout.builder(CFG).fully_contiguous().allocate_system().build()
    handle = manager.register_layout(physical)
    assert manager.register_layout(physical) == handle
    assert manager.layout(handle) is physical
    manager.release_layout(handle)
    assert physical.released
    with pytest.raises(InvalidArgumentError, match="is not registered"):
        manager.layout(handle)
    with pytest.raises(InvalidArgumentError, match="physical must be a PhysicalLayout"):
        manager.register_layout("layout")


def test_notifications():
    ready = TransferCompleteNotification.ready()
    assert ready.poll() and not ready.could_yield() and ready.exception() is None
    ready.wait()
    future = Future()
    pending = TransferCompleteNotification.from_future(future)
    assert pending.could_yield()
    both = TransferCompleteNotification.aggregate([ready, pending])
    assert both is pending  # the ready one is dropped
    with pytest.raises(TimeoutError):
        pending.wait(timeout=0.01)
    future.set_result(None)
    asyncio.run(_await(both))
    failed = TransferCompleteNotification.failed(OSError("disk gone"))
    with pytest.raises(TransferError, match="disk gone"):
        failed.wait()
    agg = TransferCompleteNotification.aggregate([ready, failed])
    assert isinstance(agg.exception(), TransferError)
    f1, f2 = Future(), Future()
    many = TransferCompleteNotification.aggregate(
        [TransferCompleteNotification.from_future(f1), TransferCompleteNotification.from_future(f2)]
    )
    f1.set_result(None)
    assert not many.poll()
    f2.set_exception(ValueError("boom"))
    with pytest.raises(TransferError, match="boom"):
        many.wait()


async def _await(notification):
    await notification


def test_await_a_real_transfer(manager, tmp_path):
    src = make(manager, "system")
    dst = make(manager, "disk", folder=str(tmp_path))
    fill_blocks(manager.layout(src), range(6), FillPattern.sequential())

    async def main():
        await manager.execute_transfer(src, [1], dst, [2])

    asyncio.run(main())
    assert block_checksums(manager.layout(dst), [2]) == block_checksums(manager.layout(src), [1])


def test_fill_patterns_distinguish_blocks(manager):
    h = make(manager, "system", False)
    p = manager.layout(h)
    fill_blocks(p, range(6), FillPattern.sequential())
    sums = block_checksums(p, range(6))
    assert len(set(sums)) == 6
    layers = layer_checksums(p, [0])[0]
    assert len(set(layers)) == 3
    with pytest.raises(InvalidArgumentError, match="value must be a byte"):
        FillPattern.of_constant(300)


@pytest.mark.parametrize(
    "src_fc,formats",
    [
        (True, (NHD, UNI)),
        (False, (NHD, UNI)),
        (False, (HND, NHD)),
        (True, (UNI, HND)),
        (False, (NHD, NHD)),
    ],
)
def test_checksums_across_a_format_change(manager, src_fc, formats):
    """A block's checksum read in another format matches the block moved into that format,
    and not another block."""
    src = make(manager, "system", src_fc, formats[0])
    dst = make(manager, "system", True, formats[1])
    fill_blocks(manager.layout(src), range(6), FillPattern.sequential())
    manager.execute_transfer(src, [4, 1], dst, [0, 5]).wait(timeout=60)
    moved = block_checksums(manager.layout(dst), [0, 5])
    assert block_checksums_as(manager.layout(src), [4, 1], formats[1]) == moved
    assert block_checksums_as(manager.layout(src), [1, 4], formats[1]) != moved


@pytest.mark.parametrize("fc", [True, False], ids=["whole-blocks", "regions"])
def test_block_checksums_of_many_host_blocks_come_in_the_order_asked(fc):
    """Several host blocks hash on threads at once: each digest is BLAKE3 of its block's bytes
    (its regions in order), in the order the blocks were asked for, repeats included."""
    import blake3

    physical = shaped(PhysicalLayout.builder(CFG).kv_format(NHD), fc).allocate_system().build()
    gen = torch.Generator().manual_seed(7)
    for allocation in physical.allocations:
        view = allocation.view()
        view.copy_(torch.randint(0, 256, view.shape, dtype=torch.uint8, generator=gen))
    ids = [5, 0, 3, 3, 1, 2]
    layout = physical.layout
    regions = {
        b: [layout.region(b, layer, o) for layer in range(CFG.num_layers) for o in range(2)]
        for b in set(ids)
    }
    want = [
        blake3.blake3(b"".join(read_bytes(physical, r) for r in regions[b])).hexdigest()
        for b in ids
    ]
    assert block_checksums(physical, ids) == want
    assert [block_checksums(physical, [b])[0] for b in ids] == want
    assert len(set(want)) == 5


def test_device_memory_pool_reuse_and_threshold():
    pool = DeviceMemoryPool(torch.device("cpu"), reserve_bytes=1000, release_threshold=1500)
    assert pool.held_bytes == 1000
    a = pool.acquire(600)  # from the reserve
    assert pool.held_bytes == 0 and a.numel() == 600
    b = pool.acquire(800)  # new
    pool.release(a)
    pool.release(b)
    assert pool.held_bytes == 800  # 1000 + 800 is over 1500: the largest (1000) goes
    with pytest.raises(InvalidArgumentError, match="buffer was not handed out by this pool"):
        pool.release(torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(InvalidArgumentError, match="reserve_bytes must be a non-negative int"):
        DeviceMemoryPool(torch.device("cpu"), reserve_bytes=-1)


def test_copy_engine_preference_on_cpu_is_harmless():
    with TransferManager.builder().preferences(TransferPreferences(copy_engine=True)).build() as m:
        a, b = make(m, "pinned"), make(m, "device", True, HND)
        check_transfer(m, a, [0, 1], b, [2, 3], None)
