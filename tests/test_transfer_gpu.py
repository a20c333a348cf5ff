"""TransferManager on a GPU: device and pinned memory for real, every GPU strategy."""

from dataclasses import replace

import pytest
import torch

from kvblocks.errors import InvalidArgumentError
from kvblocks.kernels import CopyPlan, PermutePlan, pinned_programs
from kvblocks.layout import LayoutKind
from kvblocks.transfer import (
    FillPattern,
    Strategy,
    TransferManager,
    TransferOptions,
    TransferPreferences,
    block_checksums,
    fill_blocks,
    staging,
)
from kvblocks.transfer.verify import read_bytes

from .helpers import kernel_compiles
from .test_transfer import (
    CFG,
    FORMAT_PAIRS,
    HND,
    NHD,
    UNI,
    check_transfer,
    check_transfers_from_threads,
    make,
)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def manager():
    with TransferManager.builder().cuda_device_id(0).build() as m:
        yield m


@pytest.mark.parametrize("formats", FORMAT_PAIRS, ids=lambda f: f"{f[0].name}-{f[1].name}")
@pytest.mark.parametrize(
    "kinds", [("device", "pinned"), ("pinned", "device"), ("device", "device")]
)
def test_kernel_strategy(manager, kinds, formats):
    s_fmt, d_fmt = formats
    src = make(manager, kinds[0], s_fmt == UNI or kinds[0] == "pinned", s_fmt)
    dst = make(manager, kinds[1], True, d_fmt)
    assert manager.strategy(src, dst) is Strategy.KERNEL
    check_transfer(manager, src, [5, 0, 3], dst, [1, 2, 4], None)


@pytest.mark.parametrize(
    "formats", [(NHD, NHD), (NHD, UNI), (HND, NHD)], ids=lambda f: f"{f[0].name}-{f[1].name}"
)
@pytest.mark.parametrize(
    "kinds", [("device", "pinned"), ("pinned", "device"), ("device", "device")], ids="-".join
)
def test_kernels_read_and_write_k_and_v_apart(manager, kinds, formats):
    """Layouts with each layer's K and V in allocations of their own (SGLang's cache) on either
    side of a kernel transfer, wherever the format is operational."""
    s_fmt, d_fmt = formats
    src = make(manager, kinds[0], True if s_fmt == UNI else LayoutKind.OUTER_SEPARATE, s_fmt)
    dst = make(manager, kinds[1], True if d_fmt == UNI else LayoutKind.OUTER_SEPARATE, d_fmt)
    assert manager.strategy(src, dst) is Strategy.KERNEL
    check_transfer(manager, src, [5, 0, 3], dst, [1, 2, 4], None)


@pytest.mark.parametrize(
    "kinds,strategy",
    [
        (("device", "system"), Strategy.PINNED_BOUNCE),
        (("system", "device"), Strategy.PINNED_BOUNCE),
        (("device", "disk"), Strategy.DISK_BOUNCE),
        (("disk", "device"), Strategy.DISK_BOUNCE),
    ],
)
@pytest.mark.parametrize("formats", [(NHD, NHD), (NHD, HND), (HND, UNI)])
def test_bounced_strategies(manager, tmp_path, kinds, strategy, formats):
    s_fmt, d_fmt = formats
    src = make(manager, kinds[0], True, s_fmt, folder=str(tmp_path))
    dst = make(manager, kinds[1], True, d_fmt, folder=str(tmp_path))
    assert manager.strategy(src, dst) is strategy
    check_transfer(manager, src, [1, 2], dst, [3, 0], None)


@pytest.mark.parametrize("formats", [(NHD, NHD), (NHD, UNI)], ids=["copy", "permute"])
@pytest.mark.parametrize(
    "kinds,reads_host,writes_host",
    [
        (("pinned", "device"), True, False),
        (("device", "pinned"), False, True),
        (("device", "device"), False, False),
    ],
)
def test_kernels_on_pinned_memory_hold_few_programs(
    manager, monkeypatch, kinds, reads_host, writes_host, formats
):
    """The copy and permute kernels run on a capped grid where they read or write pinned
    memory (they wait on PCIe there, so the rest of the GPU stays free), on a program per
    step in device memory; the bytes land either way."""
    grids = []
    for plan_type in (CopyPlan, PermutePlan):

        def recording_run(plan, run=plan_type.run):
            grids.append((type(plan), plan.programs, plan.step_bytes))
            run(plan)

        monkeypatch.setattr(plan_type, "run", recording_run)
    src = make(manager, kinds[0], False, formats[0])
    dst = make(manager, kinds[1], True, formats[1])
    check_transfer(manager, src, [5, 0, 3], dst, [1, 2, 4], None)
    kernel = PermutePlan if formats[0] != formats[1] else CopyPlan
    assert grids and {kind for kind, _, _ in grids} == {kernel}
    for _, programs, step in grids:
        assert programs == pinned_programs(reads_host, writes_host, step)


def test_layer_ranges_on_the_gpu(manager):
    src = make(manager, "device", False, NHD)
    dst = make(manager, "pinned", True, NHD)
    check_transfer(
        manager, src, [0, 4], dst, [5, 1], range(1, 3), TransferOptions(layer_range=range(1, 3))
    )


@pytest.mark.parametrize("formats", [(NHD, NHD), (NHD, UNI), (UNI, HND)])
@pytest.mark.parametrize("kinds", [("device", "pinned"), ("pinned", "device")])
def test_copy_engine_preference(kinds, formats):
    prefs = TransferPreferences(copy_engine=True)
    with TransferManager.builder().preferences(prefs).cuda_pool_reserve_size(1 << 20).build() as m:
        s_fmt, d_fmt = formats
        src = make(m, kinds[0], True, s_fmt)
        dst = make(m, kinds[1], True, d_fmt)
        expected = Strategy.COPY_ENGINE if s_fmt == d_fmt else Strategy.STAGED
        assert m.strategy(src, dst) is expected
        check_transfer(m, src, [0, 1, 2], dst, [3, 4, 5], None)
        assert m.memory_pool.held_bytes >= 1 << 20


def test_caller_stream_and_ordering(manager):
    src = make(manager, "device", True, NHD)
    dst = make(manager, "pinned", True, NHD)
    sp, dp = manager.layout(src), manager.layout(dst)
    fill_blocks(sp, range(6), FillPattern.sequential())
    view = sp.allocations[0].view()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(20_000_000)  # the fill below lands well after the call returns
        view.fill_(9)
        note = manager.execute_transfer(src, [2], dst, [2], TransferOptions(cuda_stream=stream))
    assert note.poll()  # the caller owns synchronization
    stream.synchronize()
    assert block_checksums(dp, [2]) == block_checksums(sp, [2])
    # Without a caller stream the transfer still waits for work queued on the current stream.
    torch.cuda._sleep(20_000_000)
    view.fill_(3)
    manager.execute_transfer(src, [1], dst, [1]).wait()
    block = read_bytes(dp, dp.layout.block_region(1))
    assert block == bytes([3]) * len(block)


def test_caller_stream_only_for_gpu_transfers(manager, tmp_path):
    src = make(manager, "device")
    dst = make(manager, "disk", folder=str(tmp_path))
    with pytest.raises(InvalidArgumentError, match="cuda_stream applies only"):
        manager.execute_transfer(
            src, [0], dst, [0], TransferOptions(cuda_stream=torch.cuda.Stream())
        )


def test_caller_stream_must_be_a_stream_of_the_transfers_gpu(manager):
    class Elsewhere(torch.cuda.Stream):
        @property
        def device(self):
            return torch.device("cuda", 7)

    src = make(manager, "device")
    dst = make(manager, "pinned")
    fill_blocks(manager.layout(src), [0], FillPattern.sequential())
    fill_blocks(manager.layout(dst), [0], FillPattern.of_constant(0xAB))
    poisoned = read_bytes(manager.layout(dst), manager.layout(dst).layout.block_region(0))
    with pytest.raises(InvalidArgumentError, match="cuda_stream is a stream of cuda:7"):
        manager.execute_transfer(src, [0], dst, [0], TransferOptions(cuda_stream=Elsewhere()))
    with pytest.raises(InvalidArgumentError, match="cuda_stream must be a torch.cuda.Stream"):
        manager.execute_transfer(src, [0], dst, [0], TransferOptions(cuda_stream=0))
    torch.cuda.synchronize()
    unchanged = read_bytes(manager.layout(dst), manager.layout(dst).layout.block_region(0))
    assert unchanged == poisoned


@pytest.mark.parametrize(
    "kinds, formats",
    [
        (("pinned", "device"), (NHD, NHD)),
        (("device", "pinned"), (NHD, HND)),
        (("device", "device"), (HND, UNI)),
    ],
    ids=["h2d", "d2h-permute", "d2d-permute"],
)
def test_transfers_from_many_threads(manager, kinds, formats):
    check_transfers_from_threads(manager, kinds, formats, 96, 6)


def test_stream_pool_round_robin(manager):
    streams = [manager.streams.h2d() for _ in range(8)]
    assert len({s.cuda_stream for s in streams}) == 4
    assert streams[0].cuda_stream == streams[4].cuda_stream
    assert manager.streams.d2h().cuda_stream not in {s.cuda_stream for s in streams}


@pytest.mark.parametrize("into_device", [True, False], ids=["h2d", "d2h"])
def test_large_transfers_of_whole_pinned_blocks_take_the_copy_engine(into_device):
    """From ``copy_engine_min_bytes`` up, whole pinned blocks move through the copy engine to
    or from whole device blocks; from ``staged_min_bytes`` up, they are staged through device
    memory for a layer-separate device layout or a format change. Fewer bytes, a layer range
    or pinned regions stay with the kernel."""
    block = CFG.block_bytes
    prefs = TransferPreferences(copy_engine_min_bytes=3 * block, staged_min_bytes=4 * block)
    with TransferManager.builder().preferences(prefs).build() as m:
        pinned = make(m, "pinned", True, NHD)
        device = {
            "whole": make(m, "device", True, NHD),
            "regions": make(m, "device", False, NHD),
            "hnd regions": make(m, "device", False, HND),
        }

        def strategy(device_side, options=None, n=6, pinned_side=pinned):
            ends = (pinned_side, device_side) if into_device else (device_side, pinned_side)
            return m.strategy(*ends, options, num_blocks=n)

        def check(device_side, options=None):
            ends = (pinned, device_side) if into_device else (device_side, pinned)
            check_transfer(m, ends[0], [5, 0, 3, 1], ends[1], [2, 4, 0, 5], None, options)

        assert strategy(device["whole"], n=3) is Strategy.COPY_ENGINE
        check(device["whole"])
        for name in ("regions", "hnd regions"):
            assert strategy(device[name], n=4) is Strategy.STAGED
            check(device[name])
        assert strategy(device["regions"], n=3) is Strategy.KERNEL
        universal = TransferOptions(**{("dst" if into_device else "src") + "_kv_layout": UNI})
        assert strategy(device["whole"], universal) is Strategy.STAGED
        assert strategy(device["whole"], n=2) is Strategy.KERNEL
        some_layers = TransferOptions(layer_range=range(1, 3))
        assert strategy(device["regions"], some_layers) is Strategy.KERNEL
        pinned_regions = make(m, "pinned", False, NHD)
        assert strategy(device["regions"], pinned_side=pinned_regions) is Strategy.KERNEL
    off = TransferPreferences(copy_engine_min_bytes=None, staged_min_bytes=None)
    with TransferManager.builder().preferences(off).build() as m:
        pinned = make(m, "pinned", True, NHD)
        for fc in (True, False):
            device_side = make(m, "device", fc, NHD)
            ends = (pinned, device_side) if into_device else (device_side, pinned)
            assert m.strategy(*ends, num_blocks=CFG.num_blocks) is Strategy.KERNEL


def test_transfers_of_new_block_counts_compile_nothing(monkeypatch):
    """Once one block has moved each way, as a BlockManager does when it starts, and one
    staged transfer each way, transfers of other block counts (direct or staged in one piece
    or several, copy or permute kernel) reuse the compiled kernels: no compile on an engine's
    critical path."""
    cfg = replace(CFG, num_blocks=64)
    monkeypatch.setattr(staging, "PIECE_BYTES", 21 * cfg.block_bytes)  # pieces start at 21, 42
    prefs = TransferPreferences(copy_engine_min_bytes=None, staged_min_bytes=20 * cfg.block_bytes)
    with TransferManager.builder().preferences(prefs).build() as m:
        device = make(m, "device", False, NHD, cfg)
        pinned = make(m, "pinned", True, NHD, cfg)
        universal = TransferOptions(dst_kv_layout=UNI), TransferOptions(src_kv_layout=UNI)

        def both_ways(n: int) -> None:
            ids = list(range(n))
            for into, out_of in ((TransferOptions(), TransferOptions()), universal):
                m.execute_transfer(device, ids, pinned, ids, into).wait(timeout=60)
                m.execute_transfer(pinned, ids, device, ids, out_of).wait(timeout=60)

        both_ways(1)
        assert m.strategy(device, pinned, num_blocks=20) is Strategy.STAGED
        both_ways(20)
        with kernel_compiles() as compiled:
            for n in (2, 3, 5, 16, 17, 19, 21, 32, 33, 43, 64):
                both_ways(n)
        assert compiled == []
        check_transfer(
            m,
            pinned,
            [7, 0, 39, *range(40, 61)],
            device,
            [1, 38, 2, *range(41, 62)],
            None,
            universal[1],
        )
