"""Batched layout permutes: one launch converts ``nb`` blocks between block formats.

Each side of a permute is an :class:`Operand`: a block format plus how its address table
points at the blocks, either one entry per ``(block, layer, outer)`` region (a block stack,
``nb * nl * no`` entries, block-major as :meth:`Layout.region_table` builds them) or one entry
per whole block (``nb`` entries). Regions and blocks may be in device memory or in pinned host
memory, which the kernel reads and writes directly, so a permute can also be the host<->device
transfer.

The kernel moves rows of ``hd`` contiguous elements. Every format keeps ``hd`` innermost, so a
row is contiguous on both sides; the row ``(l, o, t, h)`` sits at
``l * SL + o * SO + t * ST + h * SH`` rows from its operand's base (for a block stack, from the
region's base, with ``SL = SO = 0``). One program handles one tile of one ``(block, layer, outer)``
region's ``nt * nh`` rows, walked in the source's order so the reads of a tile are one span.

The six conversions of the seed API are below the kernel; :func:`permute` is the general form.
Their meaning is :func:`kvblocks.kernels.reference.convert`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from kvblocks.errors import InvalidArgumentError, LayoutFormatError, LengthMismatchError
from kvblocks.kernels import reference
from kvblocks.kernels._triton import LAUNCH_LOCK, tl, triton
from kvblocks.kernels.addresses import (
    AddressTable,
    StridedTable,
    check_alignment,
    check_disjoint,
    common_alignment,
    host_table,
    table_entry,
    tensor_at,
)
from kvblocks.kernels.backend import Backend, available, default_device
from kvblocks.kernels.grid import check_programs, grid_size
from kvblocks.layout import BlockDim, InnerOrder, KvBlockLayout, KvDims, layer_range

#: Bytes one program moves (a tile of rows); tuned on the H100 by bench/tune.py.
TILE_BYTES = 65536
NUM_WARPS = 8


# Counts that grow with the number of blocks are not specialized on (a value of 1, a multiple
# of 16), nor block id tables on their alignment (a slice of one may start at any entry), so
# that a transfer of a block count not seen before, or a piece of one, runs without a compile.
@triton.jit(
    do_not_specialize=["num_regions", "num_items", "src_layer0", "dst_layer0"],
    do_not_specialize_on_alignment=["src_ids", "dst_ids"],
)
def _permute_kernel(
    src_ids,
    src_bases,
    src_stride,
    src_per_block,
    dst_ids,
    dst_bases,
    dst_stride,
    dst_per_block,
    num_regions,
    num_items,
    src_layer0,
    dst_layer0,
    NL: tl.constexpr,
    NO: tl.constexpr,
    NT: tl.constexpr,
    NH: tl.constexpr,
    HD: tl.constexpr,
    SRC_STACK: tl.constexpr,
    SL: tl.constexpr,
    SO: tl.constexpr,
    ST: tl.constexpr,
    SH: tl.constexpr,
    DST_STACK: tl.constexpr,
    DL: tl.constexpr,
    DO: tl.constexpr,
    DT: tl.constexpr,
    DH: tl.constexpr,
    ELEM: tl.constexpr,
    ALIGNED: tl.constexpr,
    WIDE: tl.constexpr,
    ROWS: tl.constexpr,
    HD_BLOCK: tl.constexpr,
):
    # NL is the number of layers moved, from each side's first layer on (src_layer0,
    # dst_layer0); the strides are those of each side's whole blocks.
    # Item i is tile i // num_regions of region i % num_regions; program p moves items p,
    # p + G, p + 2G, ... of the G programs' grid (one item each when there is one per item).
    # Neighbouring items are the regions of one block: measured on the H100 as the most
    # robust order (walking layer by layer, or diagonally, lost 1 to 3 points).
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        if WIDE:
            item = tl.cast(item, tl.int64)
        # region b * NL * NO + l * NO + o: the index into a block stack's table
        region = item % num_regions
        tile = item // num_regions
        block = region // (NL * NO)
        lo = region % (NL * NO)
        layer = lo // NO
        outer = lo % NO
        rows = tile * ROWS + tl.arange(0, ROWS)
        if SH < ST:  # the source is token-major inside a region: walk (t, h) with h fastest
            t = rows // NH
            h = rows % NH
        else:
            h = rows // NT
            t = rows % NT
        src_rows = t * ST + h * SH
        dst_rows = t * DT + h * DH
        if SRC_STACK:
            src_addr = table_entry(src_ids, src_bases, src_stride, src_per_block, region)
        else:
            src_addr = table_entry(src_ids, src_bases, src_stride, src_per_block, block)
            src_rows += (src_layer0 + layer) * SL + outer * SO
        if DST_STACK:
            dst_addr = table_entry(dst_ids, dst_bases, dst_stride, dst_per_block, region)
        else:
            dst_addr = table_entry(dst_ids, dst_bases, dst_stride, dst_per_block, block)
            dst_rows += (dst_layer0 + layer) * DL + outer * DO
        src = src_addr.to(tl.pointer_type(ELEM))
        dst = dst_addr.to(tl.pointer_type(ELEM))
        if ALIGNED:
            src = tl.multiple_of(src, 16)
            dst = tl.multiple_of(dst, 16)

        cols = tl.arange(0, HD_BLOCK)
        src_ptrs = src + src_rows[:, None] * HD + cols[None, :]
        dst_ptrs = dst + dst_rows[:, None] * HD + cols[None, :]
        # Every byte is touched once: stream it through L2 rather than keep it there.
        if (NT * NH) % ROWS == 0 and HD == HD_BLOCK:
            vals = tl.load(src_ptrs, eviction_policy="evict_first")
            tl.store(dst_ptrs, vals, cache_modifier=".cs")
        else:
            mask = (rows < NT * NH)[:, None] & (cols < HD)[None, :]
            vals = tl.load(src_ptrs, mask=mask, eviction_policy="evict_first")
            tl.store(dst_ptrs, vals, mask=mask, cache_modifier=".cs")


@dataclass(frozen=True)
class Operand:
    """One side of a permute: a block format and how the address table reaches the blocks.

    Attributes:
        format: the order of dims inside a block; must state it (not ``Unknown``).
        stack: True for a block stack (one table entry per region; the format must then be
            operational and gives the region order), False for one entry per block.
        moved_layers_only: whole blocks that hold only the layers a permute of some layers
            moves, numbered from 0 (the blocks of a staging slot): ``[..., len(layers), ...]``
            in ``format``, where the other side's blocks hold every layer. Not for a stack,
            whose table already names the moved layers' regions only.
    """

    format: KvBlockLayout
    stack: bool = False
    moved_layers_only: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.format, KvBlockLayout) or self.format.dim_order is None:
            raise LayoutFormatError("format", f"must state its dimension order, got {self.format}")
        if self.stack and not self.format.is_operational():
            raise LayoutFormatError(
                "format", f"of a block stack must be operational (NHD or HND), got {self.format}"
            )
        if self.stack and self.moved_layers_only:
            raise InvalidArgumentError(
                "moved_layers_only", "applies to whole blocks, not to a block stack"
            )

    @staticmethod
    def block_stack(order: InnerOrder) -> Operand:
        """``nl * no`` separate regions per block, each ``[nt, nh, hd]`` or ``[nh, nt, hd]``."""
        return Operand(order.operational, stack=True)

    @staticmethod
    def operational(order: InnerOrder) -> Operand:
        """Contiguous blocks ``[nl, no, inner]``."""
        return Operand(order.operational)

    @staticmethod
    def universal() -> Operand:
        """Contiguous blocks ``[nh, nl, no, nt, hd]``."""
        return Operand(KvBlockLayout.UniversalTP)

    def entries_per_block(self, dims: KvDims, num_layers: int | None = None) -> int:
        """Table entries one block takes when ``num_layers`` of its layers move (all by
        default)."""
        return (dims.nl if num_layers is None else num_layers) * dims.no if self.stack else 1

    def span_bytes(self, dims: KvDims, num_layers: int | None = None) -> int:
        """Bytes each table entry points at, when ``num_layers`` of a block's layers move (all
        by default)."""
        return dims.region_bytes if self.stack else self.block_dims(dims, num_layers).block_bytes

    def block_dims(self, dims: KvDims, num_layers: int | None = None) -> KvDims:
        """The dims of this operand's blocks when ``num_layers`` of the layers of blocks of
        ``dims`` move: ``dims``, or ``num_layers`` layers of them for ``moved_layers_only``."""
        if self.moved_layers_only and num_layers is not None:
            return replace(dims, nl=num_layers)
        return dims

    def row_strides(self, dims: KvDims, num_layers: int | None = None) -> tuple[int, int, int, int]:
        """Distance in rows of ``hd`` between neighbours along ``(nl, no, nt, nh)``, when
        ``num_layers`` of a block's layers move (all by default)."""
        dims = self.block_dims(dims, num_layers)
        strides, step = {}, 1
        for dim in reversed(self.format.dim_order):
            strides[dim] = step
            step *= dims.size(dim)
        if self.stack:  # each region has its own base address
            strides[BlockDim.LAYER] = strides[BlockDim.OUTER] = 0
        return tuple(
            strides[d] for d in (BlockDim.LAYER, BlockDim.OUTER, BlockDim.PAGE, BlockDim.HEAD)
        )


_INT_OF_WIDTH = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class PermutePlan:
    """A validated permute, ready to run any number of times.

    Build one with :func:`plan_permute`; :meth:`run` launches on the current stream of the
    plan's device (CUDA) or runs on the CPU. ``src_table`` and ``dst_table`` hold each
    operand's table (:meth:`Operand.entries_per_block` entries per block), on ``device`` for
    the Triton backends. With ``layers``, only those layers of each block move: a block
    stack's table then holds their regions only, a whole block's entry is still the block's
    start.
    """

    src: Operand
    dst: Operand
    dims: KvDims
    nb: int
    device: torch.device
    backend: Backend
    src_table: StridedTable
    dst_table: StridedTable
    aligned: bool
    launch: tuple[tuple[int, int], dict] | None
    programs: int | None = None
    layers: range | None = None

    @classmethod
    def of_checked_tables(
        cls,
        src: Operand,
        src_table: StridedTable,
        dst: Operand,
        dst_table: StridedTable,
        dims: KvDims,
        device: torch.device,
        aligned: bool,
        programs: int | None = None,
        layers: range | None = None,
    ) -> PermutePlan:
        """A plan over tables already on ``device`` that the caller has checked as
        :func:`plan_permute` would (lengths, element alignment, no overlap, ``layers``).
        ``aligned``: every address is a multiple of 16 bytes."""
        layers = _whole_or_part(layers, dims)
        count = _count(layers, dims)
        nb = len(src_table) // src.entries_per_block(dims, count)
        backend = available(device)
        launch = (
            None
            if backend is Backend.REFERENCE
            else _launch_config(src, dst, dims, nb, aligned, count)
        )
        return cls(
            src,
            dst,
            dims,
            nb,
            device,
            backend,
            src_table,
            dst_table,
            aligned,
            launch,
            programs,
            layers,
        )

    def run(self) -> None:
        if self.backend is Backend.REFERENCE:
            self._run_reference()
        else:
            self._launch()

    @property
    def step_bytes(self) -> int:
        """Bytes a program moves at a time (a tile of rows)."""
        return permute_step_bytes(self.dims)

    @property
    def num_programs(self) -> int:
        """Programs the kernel launches with (a run on the Triton backend): one per tile of a
        region, or ``programs`` at most."""
        (regions, tiles), _ = self.launch
        return grid_size(regions * tiles, self.programs)

    def _launch(self) -> None:
        (regions, tiles), constants = self.launch
        items = regions * tiles
        with LAUNCH_LOCK:
            _permute_kernel[(grid_size(items, self.programs),)](
                *self.src_table.kernel_args(),
                *self.dst_table.kernel_args(),
                regions,
                items,
                self._first_layer(self.src),
                self._first_layer(self.dst),
                **constants,
            )

    def _first_layer(self, operand: Operand) -> int:
        """The index, in ``operand``'s blocks, of the first layer moved."""
        return 0 if self.layers is None or operand.moved_layers_only else self.layers.start

    def _run_reference(self) -> None:
        dims = self.dims
        if dims.itemsize == 1:  # torch has no indexed copies of fp8 on the CPU: move bytes
            dims = replace(dims, dtype=torch.uint8)
        if self.layers is not None:
            count = len(self.layers)
            src_bytes = self.src.span_bytes(dims, count)
            dst_bytes = self.dst.span_bytes(dims, count)
            reference.convert_layers(
                _tensors_at(self.src_table, src_bytes, dims.dtype, self.device),
                _tensors_at(self.dst_table, dst_bytes, dims.dtype, self.device),
                dims,
                self.layers,
                self.src.format,
                self.dst.format,
                src_is_stack=self.src.stack,
                dst_is_stack=self.dst.stack,
                src_has_moved_layers_only=self.src.moved_layers_only,
                dst_has_moved_layers_only=self.dst.moved_layers_only,
            )
            return
        if self.device.type == "cpu":
            src_rows = _block_rows(self.src_table, self.src.span_bytes(dims), dims.dtype)
            dst_rows = _block_rows(self.dst_table, self.dst.span_bytes(dims), dims.dtype)
            if src_rows is not None and dst_rows is not None:
                blocks = _gather_rows(src_rows, self.src_table.ids)
                converted = reference.permute_blocks(blocks, dims, self.src.format, self.dst.format)
                _scatter_rows(dst_rows, self.dst_table.ids, converted)
                return
        src = _tensors_at(self.src_table, self.src.span_bytes(dims), dims.dtype, self.device)
        dst = _tensors_at(self.dst_table, self.dst.span_bytes(dims), dims.dtype, self.device)
        reference.convert(
            src,
            dst,
            dims,
            self.src.format,
            self.dst.format,
            src_is_stack=self.src.stack,
            dst_is_stack=self.dst.stack,
        )


def _whole_or_part(layers: range | None, dims: KvDims) -> range | None:
    """``layers``, or None where it names every layer (the plain permute)."""
    return None if layers is None or layers == range(dims.nl) else layers


def _count(layers: range | None, dims: KvDims) -> int:
    return dims.nl if layers is None else len(layers)


def _launch_config(
    src: Operand, dst: Operand, dims: KvDims, nb: int, aligned: bool, num_layers: int
) -> tuple[tuple[int, int], dict]:
    """The regions and tiles per region of a permute of ``num_layers`` layers of each block,
    and its compile-time constants."""
    regions = nb * num_layers * dims.no
    wide = max(dims.block_elems, regions) >= 2**31 - 1
    tiles, constants = _constants(src, dst, dims, aligned, wide, num_layers)
    return (regions, tiles), constants


@functools.lru_cache(maxsize=256)
def _constants(
    src: Operand, dst: Operand, dims: KvDims, aligned: bool, wide: bool, num_layers: int
) -> tuple[int, dict]:
    """Tiles per region and the kernel's constants, worked out once per kind of permute
    (transfers repeat the same few)."""
    hd_block = _next_pow2(dims.hd)
    rows = _tile_rows(dims)
    sl, so, st, sh = src.row_strides(dims, num_layers)
    dl, do, dt, dh = dst.row_strides(dims, num_layers)
    constants = dict(
        NL=num_layers,
        NO=dims.no,
        NT=dims.nt,
        NH=dims.nh,
        HD=dims.hd,
        SRC_STACK=src.stack,
        SL=sl,
        SO=so,
        ST=st,
        SH=sh,
        DST_STACK=dst.stack,
        DL=dl,
        DO=do,
        DT=dt,
        DH=dh,
        ELEM=getattr(tl, _INT_OF_WIDTH[dims.itemsize]),
        ALIGNED=aligned,
        WIDE=wide,
        ROWS=rows,
        HD_BLOCK=hd_block,
        num_warps=NUM_WARPS,
    )
    return triton.cdiv(dims.nt * dims.nh, rows), constants


def permute_step_bytes(dims: KvDims) -> int:
    """Bytes a program of the permute kernel moves at a time (a tile of rows) for blocks of
    ``dims``."""
    return min(_tile_rows(dims), dims.nt * dims.nh) * dims.hd * dims.itemsize


def _tile_rows(dims: KvDims) -> int:
    """Rows of ``hd`` elements in one tile (a power of two: the kernel's block of rows)."""
    hd_block = _next_pow2(dims.hd)
    return max(1, min(_next_pow2(dims.nt * dims.nh), TILE_BYTES // (hd_block * dims.itemsize)))


def _block_rows(table: StridedTable, nbytes: int, dtype: torch.dtype) -> list | None:
    """For a layout's table in CPU memory, one view per chunk of a block, ``[max_id + 1,
    nbytes / itemsize]``, whose row ``b`` is that chunk of block ``b``; so the reference moves
    whole rows instead of making a tensor per entry. None for a flat table (its stride of 1 is
    less than an entry) or a stride that is not a whole number of elements."""
    itemsize = dtype.itemsize
    if table.stride < nbytes or table.stride % itemsize or table.ids.numel() == 0:
        return None
    rows = int(table.ids.max()) + 1
    span = (rows - 1) * table.stride + nbytes
    shape, strides = (rows, nbytes // itemsize), (table.stride // itemsize, 1)
    return [
        tensor_at(base, span, dtype, torch.device("cpu")).as_strided(shape, strides)
        for base in table.bases.tolist()
    ]


def _gather_rows(rows: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """``[len(ids), len(rows) * row elements]``: each block's chunks side by side."""
    return torch.stack([r.index_select(0, ids) for r in rows], dim=1).reshape(ids.numel(), -1)


def _scatter_rows(rows: list[torch.Tensor], ids: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``values`` (as :func:`_gather_rows` returns them) into the rows of blocks ``ids``."""
    chunks = values.view(ids.numel(), len(rows), -1)
    for c, r in enumerate(rows):
        r.index_copy_(0, ids, chunks[:, c])


def _tensors_at(table: StridedTable, nbytes: int, dtype: torch.dtype, device) -> list:
    return [tensor_at(addr, nbytes, dtype, device) for addr in table.expand().tolist()]


def plan_permute(
    src_table: AddressTable,
    src: Operand,
    dst_table: AddressTable,
    dst: Operand,
    dims: KvDims,
    device: torch.device | str | None = None,
    check_overlap: bool = True,
    programs: int | None = None,
    layers: range | None = None,
) -> PermutePlan:
    """Check a permute's arguments and prepare it to run.

    Args:
        src_table: addresses of the source regions or blocks (see :class:`Operand`).
        src: the source's format and table granularity.
        dst_table: addresses of the destination regions or blocks; written by runs.
        dst: the destination's format and table granularity.
        dims: block sizes and dtype.
        device: where the kernel runs (default: the current GPU, else the CPU). On a GPU every
            address must be device memory or pinned host memory.
        check_overlap: False skips the overlap check (a sort of every address), for callers
            that know the destinations overlap neither each other nor the sources.
        programs: at most this many programs move the tiles (as for the copy kernel,
            :func:`~kvblocks.kernels.pinned_programs` gives the number for pinned host
            memory); ``None``: one program per tile.
        layers: move only these layers of each block (a ``range`` with step 1); all by
            default. A block stack's table then holds ``len(layers) * no`` regions per block
            (those layers', in order); a whole block's entry is still the block's start.

    Raises:
        LengthMismatchError: the tables do not describe the same number of blocks.
        InvalidArgumentError: a null address, one not aligned to the element size, a
            ``programs`` that is not a positive int, or a bad ``layers``.
        OverlapError: two destinations overlap, or a destination overlaps a source.
    """
    if not isinstance(dims, KvDims):
        raise InvalidArgumentError("dims", f"must be a KvDims, got {type(dims).__name__}")
    check_programs(programs)
    for name, operand in (("src", src), ("dst", dst)):
        if not isinstance(operand, Operand):
            raise InvalidArgumentError(name, f"must be an Operand, got {type(operand).__name__}")
    layers = _whole_or_part(layer_range(layers, dims.nl), dims)
    count = _count(layers, dims)
    src_host = host_table(src_table, "src_table")
    per_block = src.entries_per_block(dims, count)
    if src_host.numel() == 0 or src_host.numel() % per_block:
        raise LengthMismatchError(
            "src_table",
            f"must hold a positive multiple of {per_block} addresses"
            f" ({'a region per layer and outer' if src.stack else 'one'} per block),"
            f" got {src_host.numel()}",
        )
    nb = src_host.numel() // per_block
    dst_host = host_table(dst_table, "dst_table", length=nb * dst.entries_per_block(dims, count))
    why = f"{dims.dtype} elements"
    check_alignment(src_host, dims.itemsize, "src_table", why)
    check_alignment(dst_host, dims.itemsize, "dst_table", why)
    if check_overlap:
        src_bytes, dst_bytes = src.span_bytes(dims, count), dst.span_bytes(dims, count)
        check_disjoint(src_host, src_bytes, dst_host, dst_bytes, "src_table", "dst_table")
    aligned = common_alignment(src_host, dst_host, dims.hd * dims.itemsize) == 16
    device = torch.device(device) if device is not None else default_device()
    if available(device) is Backend.TRITON:
        src_host = src_host.to(device)
        dst_host = dst_host.to(device)
    return PermutePlan.of_checked_tables(
        src,
        StridedTable.flat(src_host),
        dst,
        StridedTable.flat(dst_host),
        dims,
        device,
        aligned,
        programs,
        layers,
    )


def permute(
    src_table: AddressTable,
    src: Operand,
    dst_table: AddressTable,
    dst: Operand,
    dims: KvDims,
    device: torch.device | str | None = None,
) -> None:
    """Convert blocks between any two operands; see :func:`plan_permute` for the arguments."""
    plan_permute(src_table, src, dst_table, dst, dims, device).run()


def universal_from_block(
    block_table: AddressTable,
    universal_table: AddressTable,
    dims: KvDims,
    order: InnerOrder,
    device: torch.device | str | None = None,
) -> None:
    """Block stack -> universal. ``block_table``: ``nb * nl * no`` region addresses (regions
    ``[nt, nh, hd]`` for NHD, ``[nh, nt, hd]`` for HND); ``universal_table``: ``nb`` block
    addresses, each ``[nh, nl, no, nt, hd]``. Reference: :func:`reference.universal_from_block`."""
    permute(
        block_table, Operand.block_stack(order), universal_table, Operand.universal(), dims, device
    )


def block_from_universal(
    universal_table: AddressTable,
    block_table: AddressTable,
    dims: KvDims,
    order: InnerOrder,
    device: torch.device | str | None = None,
) -> None:
    """Universal -> block stack; the tables as in :func:`universal_from_block`.
    Reference: :func:`reference.block_from_universal`."""
    permute(
        universal_table, Operand.universal(), block_table, Operand.block_stack(order), dims, device
    )


def universal_from_operational(
    operational_table: AddressTable,
    universal_table: AddressTable,
    dims: KvDims,
    order: InnerOrder,
    device: torch.device | str | None = None,
) -> None:
    """Operational ``[nl, no, inner]`` -> universal; ``nb`` addresses on each side.
    Reference: :func:`reference.universal_from_operational`."""
    permute(
        operational_table,
        Operand.operational(order),
        universal_table,
        Operand.universal(),
        dims,
        device,
    )


def operational_from_universal(
    universal_table: AddressTable,
    operational_table: AddressTable,
    dims: KvDims,
    order: InnerOrder,
    device: torch.device | str | None = None,
) -> None:
    """Universal -> operational; ``nb`` addresses on each side.
    Reference: :func:`reference.operational_from_universal`."""
    permute(
        universal_table,
        Operand.universal(),
        operational_table,
        Operand.operational(order),
        dims,
        device,
    )


def operational_from_block(
    block_table: AddressTable,
    operational_table: AddressTable,
    dims: KvDims,
    block_order: InnerOrder,
    operational_order: InnerOrder,
    device: torch.device | str | None = None,
) -> None:
    """Block stack -> operational: a flat copy of each region when the orders agree.
    Reference: :func:`reference.operational_from_block`."""
    permute(
        block_table,
        Operand.block_stack(block_order),
        operational_table,
        Operand.operational(operational_order),
        dims,
        device,
    )


def block_from_operational(
    operational_table: AddressTable,
    block_table: AddressTable,
    dims: KvDims,
    operational_order: InnerOrder,
    block_order: InnerOrder,
    device: torch.device | str | None = None,
) -> None:
    """Operational -> block stack. Reference: :func:`reference.block_from_operational`."""
    permute(
        operational_table,
        Operand.operational(operational_order),
        block_table,
        Operand.block_stack(block_order),
        dims,
        device,
    )
