"""The engine's own G1 cache, checked against a BlockManagerConfig and viewed in its shapes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import pairwise

import torch

from kvblocks.errors import InvalidArgumentError
from kvblocks.layout import MemoryRegion
from kvblocks.pool.config import BlockManagerConfig, DeviceLayout


def _without_ones(shape: Sequence[int]) -> list[int]:
    return [d for d in shape if d != 1]


def checked_device_tensors(
    config: BlockManagerConfig, tensors: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``tensors`` viewed in ``config.device_layout``'s shapes, if they are G1 in those shapes
    (dims of size 1 may be left out: vLLM's MLA cache is ``[num_blocks, nt, hd]``), of its
    dtype, contiguous and on one device (``config.device_id``'s GPU, or the CPU). A tensor
    already in its shape is returned itself."""
    layout = config.device_layout
    count = len(config.device_tensor_shapes(1))
    what = {
        DeviceLayout.FULLY_CONTIGUOUS: "one tensor",
        DeviceLayout.OUTER_SEPARATE: f"one tensor per layer and outer chunk ({count})",
    }.get(layout, f"one tensor per layer ({count})")
    if isinstance(tensors, torch.Tensor):
        raise InvalidArgumentError(
            "device_tensors", f"must be a list of {what} for {layout.name}, got one tensor"
        )
    if isinstance(tensors, Mapping):
        raise InvalidArgumentError(
            "device_tensors",
            f"must be a list of {what} in layer order, got a {type(tensors).__name__}"
            " (for vLLM's kv_caches by layer name: [kv_caches[name] for name in layer_names])",
        )
    tensors = list(tensors)
    if len(tensors) != count:
        raise InvalidArgumentError(
            "device_tensors", f"must be {what} for {layout.name}, got {len(tensors)}"
        )
    axis = layout.block_axis
    shape = list(config.device_tensor_shapes(1)[0])
    wanted = [*map(str, shape[:axis]), "num_blocks", *map(str, shape[axis + 1 :])]
    block_elems = math.prod(shape)
    viewed: list[torch.Tensor] = []
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise InvalidArgumentError(
                f"device_tensors[{i}]", f"must be a torch.Tensor, got {type(t).__name__}"
            )
        num_blocks = t.numel() // block_elems
        full = [*shape[:axis], num_blocks, *shape[axis + 1 :]]
        # Equal shapes once the 1s are dropped hold the same elements in the same order; with
        # no blocks, where the block axis is is known only from the exact shape.
        if _without_ones(t.shape) != _without_ones(full) or (
            num_blocks == 0 and list(t.shape) != full
        ):
            raise InvalidArgumentError(
                f"device_tensors[{i}]",
                f"must be [{', '.join(wanted)}] of {config.dtype} ({layout.name},"
                f" {config.device_format.name}; dims of size 1 may be left out),"
                f" got {list(t.shape)} of {t.dtype}",
            )
        if t.dtype != config.dtype:
            hint = (
                " (vLLM keeps fp8 caches as torch.uint8: give dtype='u8', or pass"
                f" the tensor's .view({config.dtype}))"
                if t.dtype == torch.uint8 and config.dtype.itemsize == 1
                else ""
            )
            raise InvalidArgumentError(
                f"device_tensors[{i}]", f"must be {config.dtype}, got {t.dtype}{hint}"
            )
        if viewed and num_blocks != viewed[0].shape[axis]:
            raise InvalidArgumentError(
                f"device_tensors[{i}]",
                f"holds {num_blocks} blocks, device_tensors[0] {viewed[0].shape[axis]}",
            )
        if not t.is_contiguous():
            raise InvalidArgumentError(
                f"device_tensors[{i}]",
                "must be contiguous: pass the tensor in its memory order (permute a"
                " strided view back first)",
            )
        if t.device != tensors[0].device or (
            t.device.type == "cuda" and t.device.index != config.device_id
        ):
            raise InvalidArgumentError(
                f"device_tensors[{i}]",
                f"is on {t.device}; every tensor must be on the same device"
                f" (cuda:{config.device_id}, config.device_id, on a GPU)",
            )
        viewed.append(t if list(t.shape) == full else t.view(full))
    num_blocks = viewed[0].shape[axis]
    if num_blocks == 0:
        raise InvalidArgumentError("device_tensors", "hold no blocks")
    if config.device_blocks is not None and config.device_blocks != num_blocks:
        raise InvalidArgumentError(
            "device_tensors",
            f"hold {num_blocks} blocks but config.device_blocks is {config.device_blocks}",
        )
    spans = sorted(((MemoryRegion.of(t), i) for i, t in enumerate(viewed)), key=lambda s: s[0].addr)
    for (a, i), (b, j) in pairwise(spans):
        if a.overlaps(b):
            raise InvalidArgumentError(
                f"device_tensors[{max(i, j)}]",
                f"shares memory with device_tensors[{min(i, j)}]; each must have its own",
            )
    return viewed
