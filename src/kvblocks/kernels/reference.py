"""Torch references for the layout conversions: what every kernel must compute.

They run on any device and any supported dtype, write into the destinations they are given
(like the kernels), and favour clarity over speed. Two kinds of operand appear:

``Regions``: a block stack. ``nb * nl * no`` tensors, block-major then layer then outer
(region ``(b, l, o)`` is entry ``(b * nl + l) * no + o``), each one region of ``nt * nh * hd``
elements in NHD ``[nt, nh, hd]`` or HND ``[nh, nt, hd]`` order. This is what an address table of
a layer-separate layout points at.

``Blocks``: ``nb`` tensors, each one whole block of ``nl * no * nt * nh * hd`` elements in a
block format (operational ``[nl, no, inner]`` or universal ``[nh, nl, no, nt, hd]``). A single
tensor shaped ``[nb, ...]`` is also a valid ``Blocks``.

Element mapping (``b`` block, ``l`` layer, ``o`` outer, ``t`` token, ``h`` head, ``d`` in hd):

    NHD region index       (t * nh + h) * hd + d
    HND region index       (h * nt + t) * hd + d
    operational index      (l * no + o) * inner + region index
    universal index        (((h * nl + l) * no + o) * nt + t) * hd + d

A block stack in order X holds the same elements in the same order as the operational X
block: only where its regions live differs. Sources and destinations may alias; the result is
computed into a fresh tensor before it is written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch

from kvblocks.errors import (
    InvalidArgumentError,
    LengthMismatchError,
    ShapeMismatchError,
    UnsupportedDtypeError,
)
from kvblocks.layout import BlockDim, InnerOrder, KvBlockLayout, KvDims

Regions = Sequence[torch.Tensor]
Blocks = Sequence[torch.Tensor]


def _gather(
    tensors: Sequence[torch.Tensor], per_block: int, elems: int, dims: KvDims, argument: str
) -> torch.Tensor:
    """View or copy ``tensors`` (``per_block`` tensors of ``elems`` elements per block) as
    ``[nb, block_elems]``."""
    if isinstance(tensors, torch.Tensor):
        _check_dtype(tensors, dims, argument)
        if tensors.numel() == 0 or tensors.numel() % dims.block_elems:
            raise ShapeMismatchError(
                argument,
                f"has {tensors.numel()} elements, not a positive multiple of"
                f" {dims.block_elems} (one block)",
            )
        return tensors.reshape(-1, dims.block_elems)
    count = len(tensors)
    if count == 0 or count % per_block:
        raise LengthMismatchError(
            argument, f"must hold a positive multiple of {per_block} tensors, got {count}"
        )
    for i, t in enumerate(tensors):
        _check_tensor(t, elems, dims, f"{argument}[{i}]")
    _check_one_device(tensors, argument)
    return torch.stack([t.reshape(elems) for t in tensors]).view(-1, dims.block_elems)


def _scatter(
    values: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    per_block: int,
    elems: int,
    dims: KvDims,
    argument: str,
) -> None:
    """Write ``values`` (``[nb, block_elems]``) into ``tensors``, ``per_block`` tensors a block."""
    nb = values.shape[0]
    if isinstance(tensors, torch.Tensor):
        _check_tensor(tensors, nb * dims.block_elems, dims, argument)
        _check_same_device(tensors, values, argument)
        tensors.copy_(values.reshape(tensors.shape))
        return
    count = nb * per_block
    if len(tensors) != count:
        raise LengthMismatchError(
            argument, f"must hold {count} tensors to match the source, got {len(tensors)}"
        )
    for i, t in enumerate(tensors):
        _check_tensor(t, elems, dims, f"{argument}[{i}]")
        _check_same_device(t, values, f"{argument}[{i}]")
    for t, v in zip(tensors, values.reshape(count, elems), strict=True):
        t.copy_(v.reshape(t.shape))


def _check_dtype(t: object, dims: KvDims, argument: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(argument, f"must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dims.dtype:
        raise UnsupportedDtypeError(argument, f"has dtype {t.dtype}, dims say {dims.dtype}")


def _check_tensor(t: object, elems: int, dims: KvDims, argument: str) -> None:
    _check_dtype(t, dims, argument)
    if t.numel() != elems:
        raise ShapeMismatchError(argument, f"has {t.numel()} elements, expected {elems}")


def _check_one_device(tensors: Sequence[torch.Tensor], argument: str) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise InvalidArgumentError(
            argument, f"must all be on one device, got {sorted(map(str, devices))}"
        )


def _check_same_device(t: torch.Tensor, values: torch.Tensor, argument: str) -> None:
    if t.device != values.device:
        raise InvalidArgumentError(argument, f"is on {t.device}, the source is on {values.device}")


def permute_blocks(
    blocks: torch.Tensor, dims: KvDims, src_format: KvBlockLayout, dst_format: KvBlockLayout
) -> torch.Tensor:
    """Reorder ``[nb, block_elems]`` from ``src_format`` to ``dst_format``; a new contiguous tensor.

    Both formats must state their dimension order (not ``Unknown``).
    """
    src_shape = dims.block_shape(src_format)
    dims.block_shape(dst_format)
    src_order = src_format.dim_order
    # Axis 0 is the block; axes 1..4 the four dims in src order; axis 5 is hd.
    perm = [0, *(1 + src_order.index(d) for d in dst_format.dim_order), 5]
    nb = blocks.shape[0]
    shape, perm = merge_axes([nb, *src_shape], perm)
    out = blocks.reshape(shape).permute(perm).clone(memory_format=torch.contiguous_format)
    return out.view(nb, dims.block_elems)


def merge_axes(shape: Sequence[int], perm: Sequence[int]) -> tuple[list[int], list[int]]:
    """Fewer axes for the same permutation: source axes that stay neighbours, in order, under
    ``perm`` become one.

    Returns ``(merged_shape, merged_perm)`` such that, for any contiguous ``x`` of ``shape``,
    ``x.reshape(merged_shape).permute(merged_perm)`` lists the elements of ``x.permute(perm)``
    in the same order. Torch copies the merged form faster (fewer, longer loops): a block stack
    to universal, ``[nb, nl, no, nt, nh, hd] -> [nb, nh, nl, no, nt, hd]``, becomes one
    transpose, ``[nb, nl*no*nt, nh, hd] -> [nb, nh, nl*no*nt, hd]``."""
    runs: list[list[int]] = []
    for axis in perm:
        if runs and runs[-1][-1] + 1 == axis:
            runs[-1].append(axis)
        else:
            runs.append([axis])
    by_source = sorted(range(len(runs)), key=lambda r: runs[r][0])
    merged = [math.prod(shape[a] for a in runs[r]) for r in by_source]
    return merged, [by_source.index(r) for r in range(len(runs))]


def convert(
    src: Regions | Blocks,
    dst: Regions | Blocks,
    dims: KvDims,
    src_format: KvBlockLayout,
    dst_format: KvBlockLayout,
    *,
    src_is_stack: bool = False,
    dst_is_stack: bool = False,
) -> None:
    """The general conversion every other function here is a case of.

    Args:
        src: ``Regions`` when ``src_is_stack`` (their order is ``src_format``, an operational
            format), else ``nb`` blocks in ``src_format``.
        dst: likewise for the destination; written.
        src_format, dst_format: block formats that state their dim order.
    """
    if src_is_stack:
        x = _gather(src, _regions_per_block(dims), dims.inner, dims, "src")
    else:
        x = _gather(src, 1, dims.block_elems, dims, "src")
    y = permute_blocks(x, dims, src_format, dst_format)
    if dst_is_stack:
        _scatter(y, dst, _regions_per_block(dims), dims.inner, dims, "dst")
    else:
        _scatter(y, dst, 1, dims.block_elems, dims, "dst")


def convert_layers(
    src: Regions | Blocks,
    dst: Regions | Blocks,
    dims: KvDims,
    layers: range,
    src_format: KvBlockLayout,
    dst_format: KvBlockLayout,
    *,
    src_is_stack: bool = False,
    dst_is_stack: bool = False,
    src_has_moved_layers_only: bool = False,
    dst_has_moved_layers_only: bool = False,
) -> None:
    """:func:`convert` of layers ``layers`` of each block only; the others' elements in
    ``dst`` are left as they were.

    Args:
        src: ``len(layers) * no`` regions per block when ``src_is_stack`` (those layers',
            block-major then layer then outer), else ``nb`` whole blocks in ``src_format``:
            of every layer, or of ``layers`` only (numbered from 0) with
            ``src_has_moved_layers_only``.
        dst: likewise for the destination; written.
        layers: a non-empty step-1 range inside ``range(dims.nl)``.
    """
    part = replace(dims, nl=len(layers))
    if src_is_stack:
        x = _gather(src, _regions_per_block(part), dims.inner, part, "src")
    else:
        only = src_has_moved_layers_only
        for i, block in enumerate(src):
            _check_tensor(block, (part if only else dims).block_elems, dims, f"src[{i}]")
        x = torch.stack([_layers_of(b, dims, src_format, layers, only).reshape(-1) for b in src])
    y = permute_blocks(x, part, src_format, dst_format)
    if dst_is_stack:
        _scatter(y, dst, _regions_per_block(part), dims.inner, part, "dst")
        return
    if len(dst) != y.shape[0]:
        raise LengthMismatchError(
            "dst", f"must hold {y.shape[0]} tensors to match the source, got {len(dst)}"
        )
    only = dst_has_moved_layers_only
    for i, (b, values) in enumerate(zip(dst, y, strict=True)):
        _check_tensor(b, (part if only else dims).block_elems, dims, f"dst[{i}]")
        view = _layers_of(b, dims, dst_format, layers, only)
        view.copy_(values.view(part.block_shape(dst_format)))


def _layers_of(
    block: torch.Tensor, dims: KvDims, fmt: KvBlockLayout, layers: range, moved_only: bool
) -> torch.Tensor:
    """A view of layers ``layers`` of one block in ``fmt``, in ``fmt``'s 5-d shape; with
    ``moved_only`` the block holds those layers only, and the view is all of it."""
    if moved_only:
        return block.view(replace(dims, nl=len(layers)).block_shape(fmt))
    axis = fmt.dim_order.index(BlockDim.LAYER)
    return block.view(dims.block_shape(fmt)).narrow(axis, layers.start, len(layers))


def _regions_per_block(dims: KvDims) -> int:
    return dims.nl * dims.no


def universal_from_block(src: Regions, dst: Blocks, dims: KvDims, order: InnerOrder) -> None:
    """Block stack (regions in ``order``) -> universal blocks ``[nh, nl, no, nt, hd]``."""
    convert(src, dst, dims, order.operational, KvBlockLayout.UniversalTP, src_is_stack=True)


def block_from_universal(src: Blocks, dst: Regions, dims: KvDims, order: InnerOrder) -> None:
    """Universal blocks -> block stack (regions in ``order``)."""
    convert(src, dst, dims, KvBlockLayout.UniversalTP, order.operational, dst_is_stack=True)


def universal_from_operational(src: Blocks, dst: Blocks, dims: KvDims, order: InnerOrder) -> None:
    """Operational blocks ``[nl, no, inner]`` (inner in ``order``) -> universal blocks."""
    convert(src, dst, dims, order.operational, KvBlockLayout.UniversalTP)


def operational_from_universal(src: Blocks, dst: Blocks, dims: KvDims, order: InnerOrder) -> None:
    """Universal blocks -> operational blocks (inner in ``order``)."""
    convert(src, dst, dims, KvBlockLayout.UniversalTP, order.operational)


def operational_from_block(
    src: Regions,
    dst: Blocks,
    dims: KvDims,
    block_order: InnerOrder,
    operational_order: InnerOrder,
) -> None:
    """Block stack -> operational blocks: a flat copy when the orders agree, else a permute."""
    convert(
        src, dst, dims, block_order.operational, operational_order.operational, src_is_stack=True
    )


def block_from_operational(
    src: Blocks,
    dst: Regions,
    dims: KvDims,
    operational_order: InnerOrder,
    block_order: InnerOrder,
) -> None:
    """Operational blocks -> block stack: a flat copy when the orders agree, else a permute."""
    convert(
        src, dst, dims, operational_order.operational, block_order.operational, dst_is_stack=True
    )
