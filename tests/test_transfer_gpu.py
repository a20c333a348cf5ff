"""TransferManager on a GPU: device and pinned memory for real, every GPU strategy."""

import pytest
import torch

from kvblocks.errors import InvalidArgumentError
from kvblocks.transfer import (
    FillPattern,
    Strategy,
    TransferManager,
    TransferOptions,
    TransferPreferences,
    block_checksums,
    fill_blocks,
)
from kvblocks.transfer.verify import read_bytes

from .test_transfer import CFG, FORMAT_PAIRS, HND, NHD, UNI, check_transfer, make

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


def test_stream_pool_round_robin(manager):
    streams = [manager.streams.h2d() for _ in range(8)]
    assert len({s.cuda_stream for s in streams}) == 4
    assert streams[0].cuda_stream == streams[4].cuda_stream
    assert manager.streams.d2h().cuda_stream not in {s.cuda_stream for s in streams}


@pytest.mark.parametrize("kinds", [("device", "pinned"), ("pinned", "device")])
def test_large_whole_block_transfers_take_the_copy_engine(kinds):
    """From ``copy_engine_min_bytes`` up, whole blocks between device and pinned memory move
    through the copy engine; fewer bytes, regions, a layer range or a format change stay with
    the kernels."""
    block = CFG.block_bytes
    prefs = TransferPreferences(copy_engine_min_bytes=3 * block)
    with TransferManager.builder().preferences(prefs).build() as m:
        src = make(m, kinds[0], True, NHD)
        dst = make(m, kinds[1], True, NHD)
        assert m.strategy(src, dst, num_blocks=3) is Strategy.COPY_ENGINE
        assert m.strategy(src, dst, num_blocks=2) is Strategy.KERNEL
        some_layers = TransferOptions(layer_range=range(1, 3))
        assert m.strategy(src, dst, some_layers, num_blocks=6) is Strategy.KERNEL
        universal = TransferOptions(dst_kv_layout=UNI)
        assert m.strategy(src, dst, universal, num_blocks=6) is Strategy.KERNEL
        regions = make(m, kinds[1], False, NHD)
        assert m.strategy(src, regions, num_blocks=6) is Strategy.KERNEL
        check_transfer(m, src, [5, 0, 3, 1], dst, [2, 4, 0, 5], None)
    off = TransferPreferences(copy_engine_min_bytes=None)
    with TransferManager.builder().preferences(off).build() as m:
        src = make(m, kinds[0], True, NHD)
        dst = make(m, kinds[1], True, NHD)
        assert m.strategy(src, dst, num_blocks=CFG.num_blocks) is Strategy.KERNEL
