"""PitchedCopyPlan (one cudaMemcpy2DAsync per copy) against slicing."""

import pytest
import torch

from kvblocks.kernels.memcpy import PitchedCopyPlan

from .helpers import alloc, gpu_param

PLACES = [
    pytest.param(("cpu", "cpu"), id="cpu"),
    gpu_param(("pinned", "device")),
    gpu_param(("device", "pinned")),
    gpu_param(("device", "device")),
]
POISON = 0xAB
ROWS, WIDTH = 5, 40  # rows per copy at most; bytes per row


def _rows(buffer: torch.Tensor, slots: int, pitch: int) -> torch.Tensor:
    """``buffer`` as ``[slots, ROWS, pitch]`` bytes, on the CPU."""
    return buffer.cpu().view(slots, ROWS, pitch)


@pytest.mark.parametrize("places", PLACES)
@pytest.mark.parametrize("copies", [1, 7, 41])
def test_pitched_copies_move_their_rows_only(places, copies):
    """Copies of 1 to ``ROWS`` rows between shuffled slots, pitches wider than the rows (an
    odd one at the source), on a stream of their own: each copy's rows land, no other byte
    changes."""
    gen = torch.Generator().manual_seed(copies)
    src_pitch, dst_pitch = WIDTH + 13, WIDTH + 24
    src = alloc(copies * ROWS * src_pitch, torch.uint8, places[0])
    dst = alloc(copies * ROWS * dst_pitch, torch.uint8, places[1])
    src.copy_(torch.randint(0, 256, (src.numel(),), dtype=torch.uint8, generator=gen))
    dst.fill_(POISON)
    src_slots = torch.randperm(copies, generator=gen).tolist()
    dst_slots = torch.randperm(copies, generator=gen).tolist()
    heights = torch.randint(1, ROWS + 1, (copies,), generator=gen).tolist()
    cuda = "cpu" not in places
    plan = PitchedCopyPlan(
        [src.data_ptr() + s * ROWS * src_pitch for s in src_slots],
        [dst.data_ptr() + d * ROWS * dst_pitch for d in dst_slots],
        heights,
        WIDTH,
        src_pitch,
        dst_pitch,
        cuda,
    )
    plan.run(stream=torch.cuda.Stream() if cuda else None)
    if cuda:
        torch.cuda.synchronize()
    want = torch.full((copies, ROWS, dst_pitch), POISON, dtype=torch.uint8)
    given = _rows(src, copies, src_pitch)
    for s, d, h in zip(src_slots, dst_slots, heights, strict=True):
        want[d, :h, :WIDTH] = given[s, :h, :WIDTH]
    assert torch.equal(_rows(dst, copies, dst_pitch), want)
