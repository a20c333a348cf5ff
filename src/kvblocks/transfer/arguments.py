"""The checks a transfer's arguments pass before any work starts: block ids, block shapes,
formats, layer groups, bounce buffers and overlapping memory. Each raises an
:class:`~kvblocks.errors.InvalidArgumentError` (or a subclass) naming the argument, so that a
bad call moves nothing.
"""

from __future__ import annotations

from array import array

import torch

from kvblocks.checks import first_repeat
from kvblocks.errors import (
    BlockIdOutOfRangeError,
    ConfigMismatchError,
    InvalidArgumentError,
    LayoutFormatError,
    LengthMismatchError,
    OverlapError,
)
from kvblocks.kernels.addresses import host_ids
from kvblocks.layout import KvBlockLayout, Layout, LayoutConfig
from kvblocks.storage import PhysicalLayout, StorageKind
from kvblocks.transfer.executor import Side
from kvblocks.transfer.options import BounceBuffer, TransferOptions

_SHAPE_FIELDS = ("num_layers", "outer_dim", "page_size", "inner_dim", "dtype_width_bytes")


def checked_options(options: TransferOptions | None) -> TransferOptions:
    """``options``, or the defaults for ``None``."""
    options = options or TransferOptions()
    if not isinstance(options, TransferOptions):
        raise InvalidArgumentError("options", f"must be TransferOptions, got {options!r}")
    return options


def transfer_sides(
    src: PhysicalLayout, src_ids, dst: PhysicalLayout, dst_ids, options: TransferOptions
) -> tuple[Side, Side, range]:
    """The two sides of a transfer of blocks ``src_ids`` of ``src`` into ``dst_ids`` of
    ``dst``, and the layers it moves (``options.layer_range``), every argument checked.

    Raises:
        InvalidArgumentError (and subclasses): ids out of range, of unequal counts or
            repeated in ``dst_ids``; a destination block that is also a source; blocks of
            different shapes; a format change that the formats or configs cannot make.
    """
    s_ids = block_ids(src_ids, src.config.num_blocks, "src_ids")
    d_ids = block_ids(dst_ids, dst.config.num_blocks, "dst_ids")
    if s_ids.numel() != d_ids.numel():
        raise LengthMismatchError(
            "dst_ids",
            f"must hold as many ids as src_ids ({s_ids.numel()}), got {d_ids.numel()}",
        )
    check_same_shape(src.config, dst.config)
    repeated = first_repeat(d_ids.tolist())
    if repeated is not None:
        raise OverlapError("dst_ids", f"names block {repeated} twice")
    shared = torch.isin(d_ids, s_ids) if src is dst else None
    if shared is not None and bool(shared.any()):
        block = int(d_ids[shared][0])
        raise OverlapError(
            "dst_ids", f"block {block} is also a source in this layout; move it in two steps"
        )
    layers = src.layout.layer_range(options.layer_range)
    s_fmt = kv_format(src, options.src_kv_layout, "src_kv_layout")
    d_fmt = kv_format(dst, options.dst_kv_layout, "dst_kv_layout")
    if s_fmt.requires_transform(d_fmt):
        for name, fmt in (("src_kv_layout", s_fmt), ("dst_kv_layout", d_fmt)):
            if fmt.dim_order is None:
                raise LayoutFormatError(
                    name,
                    "is Unknown, so the block format cannot be changed: give the layout's"
                    " kv_format, or this option",
                )
        if src.config.num_heads is None or dst.config.num_heads is None:
            raise InvalidArgumentError(
                "num_heads", "must be set in both layouts' configs to change the block format"
            )
    return Side(src, s_ids, s_fmt), Side(dst, d_ids, d_fmt), layers


def kv_format(
    physical: PhysicalLayout, override: KvBlockLayout | None, argument: str
) -> KvBlockLayout:
    """The format ``physical``'s blocks are read or written as: ``override``, where given,
    else the layout's own.

    Raises:
        LayoutFormatError: ``override`` (named ``argument``) is not a KvBlockLayout, or not
            an operational one for a layout that is not fully contiguous.
    """
    if override is None:
        return physical.kv_format
    if not isinstance(override, KvBlockLayout):
        raise LayoutFormatError(argument, f"must be a KvBlockLayout, got {override!r}")
    if not physical.layout.is_fully_contiguous and not override.is_operational():
        raise LayoutFormatError(
            argument,
            f"must be operational for a {physical.layout.kind.label} layout, got {override.name}",
        )
    return override


def bounce_side(physical: PhysicalLayout, bounce: BounceBuffer, like: Side) -> Side:
    """The side of ``bounce``'s blocks of ``physical`` (its registered layout), for a
    transfer whose source is ``like``.

    Raises:
        InvalidArgumentError (and subclasses): the layout is not pinned, its blocks differ
            in shape from ``like``'s, or its block ids are out of range or not one per moved
            block.
    """
    if physical.storage is not StorageKind.PINNED:
        raise InvalidArgumentError(
            "bounce_buffer", f"must be a pinned layout, got {physical.storage.value}"
        )
    check_same_shape(like.config, physical.config, "bounce_buffer")
    ids = block_ids(bounce.block_ids, physical.config.num_blocks, "bounce_buffer.block_ids")
    if ids.numel() != like.ids.numel():
        raise LengthMismatchError(
            "bounce_buffer.block_ids",
            f"must hold one block per moved block ({like.ids.numel()}), got {ids.numel()}",
        )
    return Side(physical, ids, physical.kv_format)


def layer_group(layout: Layout, layers: range, argument: str) -> range:
    """``layers`` checked as a layer group of the blocks of ``layout``.

    Raises:
        InvalidArgumentError, BlockIdOutOfRangeError: not a non-empty step-1 range inside
            the layout's layers; the message names ``argument``.
    """
    try:
        return layout.layer_range(layers)
    except InvalidArgumentError as exc:
        raise type(exc)(argument, exc.problem) from None


def block_ids(value, num_blocks: int, argument: str) -> torch.Tensor:
    """``value`` (ints, or a 1-d int tensor) as an int64 CPU tensor of block ids, each in
    ``[0, num_blocks)``.

    Raises:
        InvalidArgumentError: not ints; BlockIdOutOfRangeError: an id out of range. The
            message names ``argument``.
    """
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool or value.dim() != 1:
            raise InvalidArgumentError(argument, f"must be a 1-d int tensor, got {value.dtype}")
        value = value.tolist()
    try:
        table = array("q", value)  # parsed in C; refuses floats and strings
    except (TypeError, OverflowError) as exc:
        raise InvalidArgumentError(argument, f"must hold ints: {exc}") from None
    # Checked in Python: a torch op would let the GIL go (see kernels.addresses.host_ids).
    if table and (min(table) < 0 or max(table) >= num_blocks):
        bad = next(i for i in table if not 0 <= i < num_blocks)
        raise BlockIdOutOfRangeError(argument, f"must be in [0, {num_blocks}), got {bad}")
    return host_ids(table)


def check_same_shape(a: LayoutConfig, b: LayoutConfig, argument: str = "dst") -> None:
    """Raise :class:`ConfigMismatchError` (naming ``argument``) unless the blocks of ``b``
    have the shape of ``a``'s (``num_blocks`` may differ; ``num_heads`` only where both
    give it)."""
    for name in _SHAPE_FIELDS:
        if getattr(a, name) != getattr(b, name):
            raise ConfigMismatchError(
                argument,
                f"has {name}={getattr(b, name)} where the source has {getattr(a, name)};"
                " blocks must have the same shape",
            )
    if a.num_heads is not None and b.num_heads is not None and a.num_heads != b.num_heads:
        raise ConfigMismatchError(
            argument, f"has num_heads={b.num_heads} where the source has {a.num_heads}"
        )


def share_memory(a: PhysicalLayout, b: PhysicalLayout) -> bool:
    """Whether two layouts' memory might overlap (then kernels check every address)."""
    if a is b:
        return False  # distinct block ids of one layout never overlap
    for physical in (a, b):
        if physical.storage in (StorageKind.DISK, StorageKind.REMOTE):
            return False
    if not a.span.overlaps(b.span):
        return False
    return any(x.overlaps(y) for x in a.layout.memory for y in b.layout.memory)
