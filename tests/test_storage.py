"""Storage: allocations, disk files and their I/O, and building physical layouts."""

import os
import stat

import pytest
import torch

from kvblocks.errors import (
    BlockIdOutOfRangeError,
    InvalidArgumentError,
    LayoutFormatError,
    LayoutReleasedError,
    LengthMismatchError,
    ShapeMismatchError,
    StorageError,
)
from kvblocks.layout import BlockDimension, KvBlockLayout, LayoutConfig
from kvblocks.storage import (
    DiskAllocation,
    KvBlocks,
    PhysicalLayout,
    StorageKind,
    allocate_device,
    allocate_pinned,
    allocate_system,
    wrap_tensor,
)
from kvblocks.storage.disk import DIRECT_ALIGN, merge_spans
from kvblocks.storage.memory import HOST_ALIGN

CFG = LayoutConfig(
    num_blocks=6,
    num_layers=3,
    outer_dim=2,
    page_size=4,
    inner_dim=32,
    dtype_width_bytes=2,
    num_heads=2,
)


@pytest.mark.parametrize(
    "allocate,kind",
    [
        (allocate_device, StorageKind.DEVICE),
        (allocate_pinned, StorageKind.PINNED),
        (allocate_system, StorageKind.SYSTEM),
    ],
)
def test_memory_allocations(allocate, kind):
    a = allocate(10_000)
    assert a.kind is kind and a.size == 10_000
    assert a.view().numel() == 10_000 and a.view().dtype == torch.uint8
    assert a.region.size == 10_000
    if a.device.type == "cpu":
        assert a.region.addr % HOST_ALIGN == 0
    assert a.emulated == (kind is not StorageKind.SYSTEM and not torch.cuda.is_available())
    a.view().fill_(7)
    a.release()
    a.release()  # twice is harmless
    with pytest.raises(LayoutReleasedError, match="allocation was released"):
        a.view()


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_allocation_sizes(bad):
    with pytest.raises(InvalidArgumentError, match="size must be a positive number of bytes"):
        allocate_system(bad)


def test_wrap_tensor_kinds():
    assert wrap_tensor(torch.zeros(8)).kind is StorageKind.SYSTEM
    wrapped = wrap_tensor(torch.zeros(8))
    assert not wrapped.owned
    with pytest.raises(InvalidArgumentError, match="tensor must be contiguous"):
        wrap_tensor(torch.zeros(4, 4).t())
    with pytest.raises(InvalidArgumentError, match="tensor must be a torch.Tensor"):
        wrap_tensor([1, 2])


def test_disk_file_round_trip(tmp_path):
    disk = DiskAllocation(tmp_path / "blocks.bin", 1 << 20)
    assert os.path.getsize(disk.path) == 1 << 20
    src = allocate_system(1 << 20)
    src.view().copy_(torch.randint(0, 256, (1 << 20,), dtype=torch.uint8))
    base = src.region.addr
    # Aligned spans (direct I/O where the filesystem allows) and unaligned ones.
    spans = [(0, base, 65536), (65536, base + 65536, 65536), (200_003, base + 200_003, 999)]
    disk.write(spans)
    dst = allocate_system(1 << 20)
    dst.view().fill_(0)
    disk.read(spans)  # into the source again: no change
    disk.read([(o, dst.region.addr + o, n) for o, _, n in spans])
    for o, _, n in spans:
        assert torch.equal(dst.view()[o : o + n], src.view()[o : o + n])
    assert torch.equal(disk.view()[:65536], src.view()[:65536])
    disk.sync()
    disk.release()
    assert not os.path.exists(disk.path)


def test_disk_errors(tmp_path):
    disk = DiskAllocation(tmp_path / "a.bin", 8192, keep=True)
    host = allocate_system(8192)
    with pytest.raises(StorageError, match="outside the file"):
        disk.read([(4096, host.region.addr, 8192)])
    os.truncate(disk.path, 100)
    with pytest.raises(StorageError, match="file ends before byte"):
        disk.read([(0, host.region.addr, 4096)])
    disk.release()
    assert os.path.exists(disk.path)  # kept
    with pytest.raises(LayoutReleasedError):
        disk.read([(0, host.region.addr, 16)])
    with pytest.raises(StorageError, match="cannot create the file"):
        DiskAllocation(tmp_path / "missing" / "b.bin", 4096)
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(StorageError, match="no room for"):
        DiskAllocation(tmp_path / "huge.bin", free + (1 << 30))
    assert not os.path.exists(tmp_path / "huge.bin")


def test_disk_path_through_a_file(tmp_path):
    (tmp_path / "plain").write_text("not a folder")
    with pytest.raises(StorageError, match="cannot create the file: Not a directory"):
        DiskAllocation(tmp_path / "plain" / "x.bin", 4096)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to read-only folders")
def test_disk_unwritable_folder(tmp_path):
    os.chmod(tmp_path, stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(StorageError, match="cannot create the file"):
            DiskAllocation(tmp_path / "x.bin", 4096)
    finally:
        os.chmod(tmp_path, stat.S_IRWXU)


def test_merge_spans():
    spans = [(100, 1100, 10), (0, 1000, 50), (50, 1050, 50), (110, 1200, 5)]
    assert merge_spans(spans) == [(0, 1000, 110), (110, 1200, 5)]
    assert merge_spans([(0, 0, 6), (6, 6, 6)], max_io=8) == [(0, 0, 6), (6, 6, 6)]


@pytest.mark.parametrize("how", ["allocate_device", "allocate_pinned", "allocate_system"])
@pytest.mark.parametrize("fc", [True, False])
def test_builder_memory(how, fc):
    builder = PhysicalLayout.builder(CFG).kv_format(KvBlockLayout.OperationalHND)
    builder = (
        builder.fully_contiguous() if fc else builder.layer_separate(BlockDimension.OUTER_FIRST)
    )
    physical = getattr(builder, how)().build()
    assert physical.storage.value == how.removeprefix("allocate_")
    assert physical.layout.is_fully_contiguous == fc
    assert len(physical.allocations) == (1 if fc else CFG.num_layers)
    assert physical.kv_format == KvBlockLayout.OperationalHND
    region = physical.layout.region(5, 2, 1)
    assert any(a.region.addr <= region.addr < a.region.end for a in physical.allocations)
    physical.release()
    with pytest.raises(LayoutReleasedError):
        physical.check_alive()


def test_builder_disk_segments_are_aligned(tmp_path):
    physical = (
        PhysicalLayout.builder(CFG).layer_separate().allocate_disk(tmp_path / "d.bin").build()
    )
    assert physical.storage is StorageKind.DISK and physical.device is None
    assert all(r.addr % DIRECT_ALIGN == 0 for r in physical.layout.memory)
    assert physical.file.size >= physical.layout.memory[-1].end
    physical.release()
    assert not os.path.exists(tmp_path / "d.bin")


def test_builder_external_regions():
    nb, no, nt, inner = CFG.num_blocks, CFG.outer_dim, CFG.page_size, CFG.inner_dim
    layers = [torch.randn(nb, no, nt, inner).to(torch.bfloat16) for _ in range(CFG.num_layers)]
    physical = PhysicalLayout.builder(CFG).layer_separate().with_external_regions(layers).build()
    assert physical.storage is StorageKind.SYSTEM
    region = physical.layout.region(4, 1, 1)
    assert region.addr == layers[1][4, 1].data_ptr()
    physical.release()  # lets the tensors go, does not free them
    assert layers[1].sum() == layers[1].sum()
    with pytest.raises(LengthMismatchError, match="memory must hold 3 allocations"):
        PhysicalLayout.builder(CFG).layer_separate().with_external_regions(layers[:2]).build()
    with pytest.raises(ShapeMismatchError, match=r"memory\[0\] is"):
        PhysicalLayout.builder(CFG).fully_contiguous().with_external_regions([layers[0]]).build()
    with pytest.raises(InvalidArgumentError, match="must be one tensor"):
        PhysicalLayout.builder(CFG).fully_contiguous().with_external_regions(layers).build()


def test_builder_errors():
    with pytest.raises(InvalidArgumentError, match="layout type is not chosen"):
        PhysicalLayout.builder(CFG).allocate_system().build()
    with pytest.raises(InvalidArgumentError, match="memory is not chosen"):
        PhysicalLayout.builder(CFG).fully_contiguous().build()
    with pytest.raises(InvalidArgumentError, match="memory is already chosen"):
        PhysicalLayout.builder(CFG).allocate_system().allocate_pinned()
    with pytest.raises(LayoutFormatError, match="must be operational"):
        PhysicalLayout.builder(CFG).layer_separate().kv_format(
            KvBlockLayout.UniversalTP
        ).allocate_system().build()
    with pytest.raises(InvalidArgumentError, match="config must be a LayoutConfig"):
        PhysicalLayout.builder({"num_blocks": 1})


def test_kv_blocks():
    fc = (
        PhysicalLayout.builder(CFG)
        .fully_contiguous()
        .kv_format(KvBlockLayout.OperationalNHD)
        .allocate_system()
        .build()
    )
    ls = (
        PhysicalLayout.builder(CFG)
        .layer_separate()
        .kv_format(KvBlockLayout.OperationalNHD)
        .allocate_system()
        .build()
    )
    a = KvBlocks(fc, [0, 5], KvBlockLayout.UniversalTP)
    b = KvBlocks(ls, [1, 2])
    assert a.effective_format == KvBlockLayout.UniversalTP and len(a) == 2
    assert a.requires_transform_to(b) and not b.requires_transform_to(KvBlocks(fc, [3]))
    assert KvBlocks(fc, [1], KvBlockLayout.OperationalNHD).kv_layout is None  # same as the layout
    with pytest.raises(BlockIdOutOfRangeError, match=r"block_ids must be in \[0, 6\), got 6"):
        KvBlocks(fc, [6])
    with pytest.raises(LayoutFormatError, match="kv_layout must be operational"):
        KvBlocks(ls, [0], KvBlockLayout.UniversalTP)
