"""Staged host-to-device copies (copy engine into a staging slot, copy kernel out of it): every
pair lands, nothing else is written, on the CPU path and on a GPU."""

import pytest
import torch

from kvblocks.errors import InvalidArgumentError, OverlapError
from kvblocks.kernels import plan_staged_h2d
from kvblocks.layout import MemoryRegion

from .helpers import gpu_param

PLACES = [pytest.param("cpu", id="cpu"), gpu_param("gpu")]
POISON = 0xAB


def _sources(num_pairs: int, size: int, where: str):
    """Random bytes; ``num_pairs`` spans of it, half of them in runs, in shuffled order."""
    buf = torch.randint(0, 256, (2 * num_pairs * size,), dtype=torch.uint8)
    if where == "gpu":
        buf = buf.pin_memory()
    slots = torch.randperm(2 * num_pairs)[:num_pairs].sort().values  # gaps and runs
    slots = slots[torch.randperm(num_pairs)].tolist()
    return buf, [buf.data_ptr() + s * size for s in slots]


def _destinations(num_pairs: int, size: int, where: str):
    stride = size + 7
    buf = torch.full((num_pairs * stride,), POISON, dtype=torch.uint8)
    buf = buf.cuda() if where == "gpu" else buf
    slots = torch.randperm(num_pairs).tolist()
    return buf, [buf.data_ptr() + s * stride for s in slots]


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize(
    "num_pairs,size,piece_bytes",
    [(1, 4096, 4096), (37, 1000, 3000), (128, 4096, 65536), (64, 33, 1 << 20), (50, 16, 16)],
)
def test_staged_copy_places_every_pair(where, num_pairs, size, piece_bytes):
    src_buf, srcs = _sources(num_pairs, size, where)
    dst_buf, dsts = _destinations(num_pairs, size, where)
    device = "cuda" if where == "gpu" else "cpu"
    held = [MemoryRegion.of(src_buf)]
    plan = plan_staged_h2d(srcs, dsts, size, held, device, piece_bytes=piece_bytes)
    assert plan.num_pieces == -(-num_pairs // (piece_bytes // size))
    for _ in range(2):  # a plan runs again, over the same slots
        dst_buf.fill_(POISON)
        plan.run()
        if where == "gpu":
            torch.cuda.synchronize()
        got = dst_buf.cpu()
        expected = torch.full_like(got, POISON)
        base_s, base_d = src_buf.data_ptr(), dst_buf.data_ptr()
        for s, d in zip(srcs, dsts, strict=True):
            expected[d - base_d : d - base_d + size] = src_buf[s - base_s : s - base_s + size]
        assert torch.equal(got, expected)


def test_runs_stop_where_an_allocation_ends():
    """Two allocations back to back: the copy engine must get one span in each, not one
    across both (CUDA refuses a copy spanning two pinned allocations)."""
    buf = torch.randint(0, 256, (8192,), dtype=torch.uint8)
    dst = torch.zeros(8192, dtype=torch.uint8)
    a, b = buf.data_ptr(), dst.data_ptr()
    halves = [MemoryRegion(a, 4096), MemoryRegion(a + 4096, 4096)]
    srcs = [a + i * 1024 for i in range(8)]
    plan = plan_staged_h2d(srcs, [b + i * 1024 for i in range(8)], 1024, halves, "cpu")
    assert plan.num_pieces == 1
    assert plan.fill(0).sizes == [4096, 4096]
    plan.run()
    assert torch.equal(dst, buf)
    whole = plan_staged_h2d(srcs, [b + i * 1024 for i in range(8)], 1024, [MemoryRegion(a, 8192)])
    assert whole.fill(0).sizes == [8192]


def test_staged_copy_checks_its_arguments():
    src = torch.zeros(4096, dtype=torch.uint8)
    dst = torch.zeros(4096, dtype=torch.uint8)
    a, b = src.data_ptr(), dst.data_ptr()
    held = [MemoryRegion.of(src)]
    with pytest.raises(InvalidArgumentError, match="size must be a positive byte count"):
        plan_staged_h2d([a], [b], 0, held, "cpu")
    with pytest.raises(InvalidArgumentError, match="piece_bytes must be an int of at least"):
        plan_staged_h2d([a], [b], 64, held, "cpu", piece_bytes=32)
    with pytest.raises(InvalidArgumentError, match="no allocation of src_allocations holds"):
        plan_staged_h2d([a + 4090], [b], 64, held, "cpu")
    with pytest.raises(OverlapError):
        plan_staged_h2d([a, a + 64], [b, b + 32], 64, held, "cpu")
    unchecked = plan_staged_h2d([a, a + 64], [b, b + 32], 64, held, "cpu", check_overlap=False)
    assert unchecked.num_pieces == 1  # the caller vouched for its destinations
    before = dst.clone()
    with pytest.raises(InvalidArgumentError):
        plan_staged_h2d([a, a + 64], [b], 64, held, "cpu")
    assert torch.equal(dst, before)
