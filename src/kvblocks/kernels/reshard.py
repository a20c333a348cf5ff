"""Tensor-parallel resharding of universal blocks.

A universal block is ``[nh, nl, no, nt, hd]``: heads outermost. A deployment at tensor-parallel
degree ``tp`` gives rank ``r`` the KV heads ``[r * nh / tp, (r + 1) * nh / tp)``, so a rank's part
of every block is one contiguous slice. Blocks saved by ``tp_from`` ranks can be served to
``tp_to`` ranks by re-slicing heads: each target rank takes the pieces of the source shards that
overlap its head range and concatenates them.

Shapes: a shard at degree ``tp`` is ``[nb, nh / tp, nl, no, nt, hd]`` (any tensor of that many
elements is accepted and read in that order), where ``nh`` is the model's total KV heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvblocks.errors import InvalidArgumentError, LengthMismatchError, ShapeMismatchError
from kvblocks.layout import KvDims


def _check_degree(dims: KvDims, tp: int, argument: str) -> int:
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise InvalidArgumentError(argument, f"must be a positive int, got {tp!r}")
    if dims.nh % tp:
        raise InvalidArgumentError(
            argument,
            f"must divide the {dims.nh} KV heads evenly, got {tp}"
            " (ranks that would replicate heads are not supported)",
        )
    return dims.nh // tp


def _shard_view(shard: torch.Tensor, dims: KvDims, heads: int, argument: str) -> torch.Tensor:
    if not isinstance(shard, torch.Tensor):
        raise InvalidArgumentError(argument, f"must be a torch.Tensor, got {type(shard).__name__}")
    if shard.dtype != dims.dtype:
        raise ShapeMismatchError(argument, f"has dtype {shard.dtype}, dims say {dims.dtype}")
    per_block = heads * dims.nl * dims.no * dims.nt * dims.hd
    if shard.numel() == 0 or shard.numel() % per_block:
        raise ShapeMismatchError(
            argument,
            f"has {shard.numel()} elements, not a positive multiple of {per_block}"
            f" (one block of {heads} heads)",
        )
    return shard.reshape(-1, heads, dims.nl, dims.no, dims.nt, dims.hd)


def split_heads(blocks: torch.Tensor, dims: KvDims, tp: int) -> list[torch.Tensor]:
    """Split full universal blocks ``[nb, nh, nl, no, nt, hd]`` into ``tp`` contiguous shards."""
    return reshard_universal([blocks], dims, tp)


def join_heads(shards: Sequence[torch.Tensor], dims: KvDims) -> torch.Tensor:
    """Join the shards of all ranks back into full universal blocks ``[nb, nh, nl, no, nt, hd]``."""
    return reshard_universal(shards, dims, 1)[0]


def reshard_universal(
    shards: Sequence[torch.Tensor], dims: KvDims, tp_to: int
) -> list[torch.Tensor]:
    """Re-slice universal blocks saved by ``len(shards)`` ranks for ``tp_to`` ranks.

    Args:
        shards: one tensor per source rank, in rank order, each ``[nb, nh / tp_from, nl, no, nt,
            hd]``; all with the same ``nb``, dtype and device.
        dims: the model's dims with ``nh`` the total KV heads over all ranks.
        tp_to: the target tensor-parallel degree.

    Returns:
        ``tp_to`` new contiguous tensors ``[nb, nh / tp_to, nl, no, nt, hd]``, in rank order.
    """
    tp_from = len(shards)
    if tp_from == 0:
        raise LengthMismatchError("shards", "must hold one tensor per source rank, got none")
    heads_from = _check_degree(dims, tp_from, "len(shards)")
    heads_to = _check_degree(dims, tp_to, "tp_to")
    views = [_shard_view(s, dims, heads_from, f"shards[{i}]") for i, s in enumerate(shards)]
    nb, device = views[0].shape[0], views[0].device
    for i, v in enumerate(views):
        if v.shape[0] != nb:
            raise ShapeMismatchError(f"shards[{i}]", f"holds {v.shape[0]} blocks, shards[0] {nb}")
        if v.device != device:
            raise InvalidArgumentError(f"shards[{i}]", f"is on {v.device}, shards[0] on {device}")

    out = []
    for rank in range(tp_to):
        lo, hi = rank * heads_to, (rank + 1) * heads_to
        pieces = []
        for src in range(lo // heads_from, (hi - 1) // heads_from + 1):
            base = src * heads_from
            pieces.append(views[src][:, max(lo, base) - base : min(hi, base + heads_from) - base])
        out.append(torch.cat(pieces, dim=1))
    return out
