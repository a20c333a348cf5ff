"""copy_blocks / swap_blocks / copy_single_block on an engine's paged KV cache.

The cache is one tensor per layer for keys and one for values, each
``[num_blocks, block_size, num_heads, head_dim]`` (any contiguous shape whose first dim is the
block works). ``block_mapping`` is ``[num_pairs, 2]``:

- :func:`copy_blocks`: block ``mapping[i, 0]`` is copied onto block ``mapping[i, 1]`` in every
  key and value cache (prefix sharing, copy on write), or, given destination caches, from the
  caches into the destination caches (which may hold another number of blocks, and on a GPU
  may live in pinned host memory; the kernel then runs on a few programs, see
  :mod:`kvblocks.kernels.grid`).
- :func:`copy_single_block`: one block, from source caches to destination caches.
- :func:`swap_blocks`: blocks ``mapping[i, 0]`` and ``mapping[i, 1]`` exchange contents in place.

One launch covers every pair and every cache. Pairs run concurrently, so a mapping whose result
would depend on their order is rejected: a destination named twice; within one cache, a block
that is both a source and a destination; for swaps, any block named twice. So are caches that
overlap one another (other than destination caches that are the source caches themselves).

References: :func:`copy_blocks_reference`, :func:`swap_blocks_reference`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum

import torch

from kvblocks.checks import first_repeat
from kvblocks.errors import (
    BlockIdOutOfRangeError,
    InvalidArgumentError,
    LengthMismatchError,
    OverlapError,
    ShapeMismatchError,
)
from kvblocks.kernels._triton import LAUNCH_LOCK, tl, triton
from kvblocks.kernels.addresses import common_alignment
from kvblocks.kernels.backend import Backend, available
from kvblocks.kernels.grid import grid_size, pinned_programs

#: Bytes of one block that one program moves; tuned on the H100 by bench/tune.py.
TILE_BYTES = 8192
NUM_WARPS = 8


# Counts that grow with the number of blocks are not specialized on (a value of 1, a multiple
# of 16), so that a transfer of a block count not seen before runs without a compile.
@triton.jit(do_not_specialize=["num_pairs", "num_items"])
def _paged_kernel(
    cache_table,
    dst_table,
    mapping,
    num_pairs,
    tiles,
    num_items,
    BLOCK_WORDS: tl.constexpr,
    WORD: tl.constexpr,
    ALIGN: tl.constexpr,
    TILE: tl.constexpr,
    SWAP: tl.constexpr,
):
    # Item i is tile i % tiles of pair (i // tiles) % num_pairs in cache i // (tiles *
    # num_pairs): caches vary slowest, so the items in flight at once touch few of the cache
    # tensors. Program p moves items p, p + G, ... of the G programs' grid.
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        i = tl.cast(item, tl.int64)
        tile = i % tiles
        rest = i // tiles
        pair = rest % num_pairs
        cache = rest // num_pairs
        base_a = tl.load(cache_table + cache).to(tl.pointer_type(WORD))
        base_a = tl.multiple_of(base_a, ALIGN)
        base_b = tl.load(dst_table + cache).to(tl.pointer_type(WORD))
        base_b = tl.multiple_of(base_b, ALIGN)
        a = tl.load(mapping + 2 * pair)
        b = tl.load(mapping + 2 * pair + 1)
        offs = tile * TILE + tl.arange(0, TILE)
        ptr_a = base_a + a * BLOCK_WORDS + offs
        ptr_b = base_b + b * BLOCK_WORDS + offs
        if BLOCK_WORDS % TILE == 0:
            va = tl.load(ptr_a)
            if SWAP:
                vb = tl.load(ptr_b)
                tl.store(ptr_a, vb)
            tl.store(ptr_b, va)
        else:
            mask = offs < BLOCK_WORDS
            va = tl.load(ptr_a, mask=mask)
            if SWAP:
                vb = tl.load(ptr_b, mask=mask)
                tl.store(ptr_a, vb, mask=mask)
            tl.store(ptr_b, va, mask=mask)


def copy_blocks_reference(
    caches: Sequence[torch.Tensor],
    mapping: torch.Tensor,
    dst_caches: Sequence[torch.Tensor] | None = None,
) -> None:
    """``dst[mapping[i, 1]] = cache[mapping[i, 0]]`` for every cache, its destination
    (``dst_caches``, default the caches themselves) and pair."""
    src, dst = mapping[:, 0].to(torch.long), mapping[:, 1].to(torch.long)
    for cache, out in zip(caches, caches if dst_caches is None else dst_caches, strict=True):
        out[dst.to(out.device)] = cache[src.to(cache.device)].to(out.device)


def swap_blocks_reference(caches: Sequence[torch.Tensor], mapping: torch.Tensor) -> None:
    """Exchange ``cache[mapping[i, 0]]`` and ``cache[mapping[i, 1]]`` for every cache and pair."""
    a, b = mapping[:, 0].to(torch.long), mapping[:, 1].to(torch.long)
    for cache in caches:
        first, second = cache[a].clone(), cache[b].clone()
        cache[a] = second
        cache[b] = first


def _check_caches(key_caches, value_caches, names=("key_caches", "value_caches")):
    """The key then the value caches as one list, each checked (contiguous tensors of one shape,
    dtype and device, with the block index as dim 0), and their names for errors (``names``:
    the arguments')."""
    key_name, value_name = names
    if isinstance(key_caches, torch.Tensor) or isinstance(value_caches, torch.Tensor):
        raise InvalidArgumentError(
            key_name, f"and {value_name} must be sequences of per-layer tensors"
        )
    keys, values = list(key_caches), list(value_caches)
    if not keys:
        raise LengthMismatchError(key_name, "must hold at least one cache tensor")
    if values and len(values) != len(keys):
        raise LengthMismatchError(
            value_name,
            f"must hold {len(keys)} tensors like {key_name} (or none), got {len(values)}",
        )
    caches = keys + values
    cache_names = [f"{key_name}[{i}]" for i in range(len(keys))]
    cache_names += [f"{value_name}[{i}]" for i in range(len(values))]
    first = caches[0]
    for cache, name in zip(caches, cache_names, strict=True):
        if not isinstance(cache, torch.Tensor):
            raise InvalidArgumentError(name, f"must be a torch.Tensor, got {type(cache).__name__}")
        if cache.dim() < 2 or not cache.is_contiguous():
            raise ShapeMismatchError(name, "must be contiguous with the block index as dim 0")
        if cache.shape != first.shape or cache.dtype != first.dtype or cache.device != first.device:
            raise ShapeMismatchError(
                name,
                f"is {cache.dtype} {list(cache.shape)} on {cache.device}, {key_name}[0] is"
                f" {first.dtype} {list(first.shape)} on {first.device}",
            )
    return caches, cache_names


def _check_disjoint(spans: list[tuple[int, int, str]]) -> None:
    """No two caches share a byte (a cache named twice would be copied or swapped twice).

    ``spans``: each cache's ``(first byte address, size in bytes, name)``.
    """
    spans = sorted(spans)
    for (start, size, first), (next_start, _, second) in zip(spans, spans[1:], strict=False):
        if next_start < start + size:
            raise OverlapError(second, f"overlaps {first}; each cache must be its own memory")


class _Rule(Enum):
    """What a mapping may name, by how its pairs could interfere."""

    SWAP = "swap"  # in place: every block once
    COPY_IN_PLACE = "copy in place"  # destinations once, none of them a source
    COPY_ACROSS = "copy across"  # destinations once; sources are other memory


def _check_mapping(block_mapping, num_blocks: int, num_dst_blocks: int, rule: _Rule):
    mapping = torch.as_tensor(block_mapping).detach().to("cpu")
    if mapping.dtype.is_floating_point or mapping.dtype.is_complex or mapping.dtype == torch.bool:
        raise InvalidArgumentError("block_mapping", f"must hold ints, got {mapping.dtype}")
    if mapping.numel() == 0:
        return mapping.reshape(0, 2).to(torch.int64)
    if mapping.dim() != 2 or mapping.shape[1] != 2:
        raise ShapeMismatchError(
            "block_mapping", f"must be [num_pairs, 2], got {list(mapping.shape)}"
        )
    mapping = mapping.to(torch.int64).contiguous()
    limits = torch.tensor([num_blocks, num_dst_blocks])
    bad = (mapping < 0) | (mapping >= limits)
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0])
        raise BlockIdOutOfRangeError(
            f"block_mapping[{i}, {j}]",
            f"must be in [0, {int(limits[j])}), got {int(mapping[i, j])}",
        )
    if rule is _Rule.SWAP:
        dup = first_repeat(mapping.flatten().tolist())
        if dup is not None:
            raise OverlapError(
                "block_mapping",
                f"names block {dup} twice; each block may take part in one swap only",
            )
        return mapping
    src, dst = mapping[:, 0], mapping[:, 1]
    dup = first_repeat(dst.tolist())
    if dup is not None:
        raise OverlapError("block_mapping", f"writes block {dup} twice (column 1 repeats)")
    both = torch.isin(dst, src)
    if rule is _Rule.COPY_IN_PLACE and bool(both.any()):
        block = int(dst[both][0])
        raise OverlapError(
            "block_mapping",
            f"uses block {block} as both a source and a destination; copy in two calls",
        )
    return mapping


def _kernel_device(caches: list[torch.Tensor], dst_caches: list[torch.Tensor]) -> torch.device:
    """Where the launch runs: the GPU of either list of caches (each on one device), else the
    caches' device."""
    return dst_caches[0].device if dst_caches[0].is_cuda else caches[0].device


def _check_reachable(caches: list[torch.Tensor], names: list[str], device: torch.device) -> None:
    """On a GPU, a list of caches (all on one device) is on that GPU or in pinned host memory
    (read or written over PCIe)."""
    if device.type != "cuda" or caches[0].device == device:
        return
    if caches[0].is_cuda:
        raise InvalidArgumentError(names[0], f"is on {caches[0].device}; other caches on {device}")
    for cache, name in zip(caches, names, strict=True):
        if not cache.is_pinned():
            raise InvalidArgumentError(
                name, "is in pageable host memory; a GPU reaches host caches only when pinned"
            )


@dataclass(frozen=True)
class PagedPlan:
    """A validated copy_blocks or swap_blocks, ready to run any number of times.

    The caches and mapping are fixed at planning; :meth:`run` is one launch (or the reference
    on a device without kernels), with no checks and no host-device synchronization.
    ``dst_caches`` is ``caches`` itself for an in-place copy or a swap. ``programs`` caps the
    grid (set where a side is pinned host memory, see
    :func:`~kvblocks.kernels.pinned_programs`); ``None``: a program per tile.
    """

    caches: tuple[torch.Tensor, ...]
    dst_caches: tuple[torch.Tensor, ...]
    mapping: torch.Tensor
    swap: bool
    backend: Backend
    cache_table: torch.Tensor
    dst_table: torch.Tensor
    block_words: int
    align: int
    programs: int | None = None

    @property
    def step_bytes(self) -> int:
        """Bytes a program moves at a time (a tile of a block)."""
        word_bytes, tile, _ = self._tiling()
        return min(tile, self.block_words) * word_bytes

    @property
    def num_programs(self) -> int:
        """Programs the kernel launches with (a run on the Triton backend)."""
        items = self.mapping.shape[0] * len(self.caches) * self._tiling()[2]
        return grid_size(items, self.programs)

    def _tiling(self) -> tuple[int, int, int]:
        """Bytes per word, words per tile, tiles per block."""
        word_bytes = min(self.align, 4)
        tile = min(TILE_BYTES // word_bytes, 1 << (self.block_words - 1).bit_length())
        return word_bytes, tile, triton.cdiv(self.block_words, tile)

    def run(self) -> None:
        if self.mapping.shape[0] == 0:
            return
        if self.backend is Backend.REFERENCE:
            if self.swap:
                swap_blocks_reference(self.caches, self.mapping)
            else:
                copy_blocks_reference(self.caches, self.mapping, self.dst_caches)
            return
        word_bytes, tile, tiles = self._tiling()
        pairs = self.mapping.shape[0]
        items = pairs * len(self.caches) * tiles
        with LAUNCH_LOCK:
            _paged_kernel[(grid_size(items, self.programs),)](
                self.cache_table,
                self.dst_table,
                self.mapping,
                pairs,
                tiles,
                items,
                BLOCK_WORDS=self.block_words,
                WORD={1: tl.int8, 2: tl.int16, 4: tl.int32}[word_bytes],
                ALIGN=self.align,
                TILE=tile,
                SWAP=self.swap,
                num_warps=NUM_WARPS,
            )


def plan_paged(
    key_caches: Sequence[torch.Tensor],
    value_caches: Sequence[torch.Tensor],
    block_mapping: torch.Tensor | Sequence[Sequence[int]],
    swap: bool = False,
    dst_key_caches: Sequence[torch.Tensor] | None = None,
    dst_value_caches: Sequence[torch.Tensor] | None = None,
) -> PagedPlan:
    """Check the caches and the mapping of a copy_blocks (or, with ``swap``, swap_blocks).

    ``dst_key_caches`` / ``dst_value_caches`` (copies only) are where the blocks go, one per
    source cache with the same block shape and dtype; by default the source caches themselves.
    """
    caches, names = _check_caches(key_caches, value_caches)
    dst_caches, dst_names = caches, names
    rule = _Rule.SWAP if swap else _Rule.COPY_IN_PLACE
    if dst_key_caches is not None or dst_value_caches is not None:
        if swap:
            raise InvalidArgumentError("dst_key_caches", "is for copies; swaps are in place")
        dst_caches, dst_names, rule = _check_destinations(caches, dst_key_caches, dst_value_caches)
    first = caches[0]
    ptrs = [c.data_ptr() for c in caches]
    dst_ptrs = [c.data_ptr() for c in dst_caches]
    spans = [(p, first.nbytes, name) for p, name in zip(ptrs, names, strict=True)]
    if rule is _Rule.COPY_ACROSS:
        size = dst_caches[0].nbytes
        spans += [(p, size, name) for p, name in zip(dst_ptrs, dst_names, strict=True)]
    _check_disjoint(spans)
    mapping = _check_mapping(block_mapping, first.shape[0], dst_caches[0].shape[0], rule)
    device = _kernel_device(caches, dst_caches)
    _check_reachable(caches, names, device)
    _check_reachable(dst_caches, dst_names, device)
    # Pairs are independent; in source order neighbouring programs read neighbouring blocks.
    mapping = mapping[torch.argsort(mapping[:, 0])].to(device)
    backend = available(device)
    block_bytes = first[0].numel() * first.element_size()
    tables = torch.tensor([ptrs, dst_ptrs], dtype=torch.int64)
    align = common_alignment(tables, block_bytes)
    tables = tables.to(device)
    plan = PagedPlan(
        tuple(caches),
        tuple(dst_caches),
        mapping,
        swap,
        backend,
        tables[0],
        tables[1],
        block_bytes // min(align, 4),
        align,
    )
    if device.type != "cuda":
        return plan
    reads_host, writes_host = not caches[0].is_cuda, not dst_caches[0].is_cuda
    return replace(plan, programs=pinned_programs(reads_host, writes_host, plan.step_bytes))


def _check_destinations(caches, dst_key_caches, dst_value_caches):
    """The destination caches of a copy, checked against the sources, their names, and the
    mapping rule: in place when each is its source's memory, else across."""
    names = ("dst_key_caches", "dst_value_caches")
    dst, dst_names = _check_caches(dst_key_caches or [], dst_value_caches or [], names)
    if len(dst) != len(caches):
        raise LengthMismatchError(
            names[0], f"and {names[1]} must hold {len(caches)} tensors in all, got {len(dst)}"
        )
    first, dst_first = caches[0], dst[0]
    if dst_first.shape[1:] != first.shape[1:] or dst_first.dtype != first.dtype:
        raise ShapeMismatchError(
            f"{names[0]}[0]",
            f"holds {dst_first.dtype} blocks of {list(dst_first.shape[1:])}, the source caches"
            f" {first.dtype} blocks of {list(first.shape[1:])}",
        )
    if all(
        d.data_ptr() == c.data_ptr() and d.nbytes == c.nbytes
        for d, c in zip(dst, caches, strict=True)
    ):
        return caches, dst_names, _Rule.COPY_IN_PLACE
    return dst, dst_names, _Rule.COPY_ACROSS


def copy_blocks(
    key_caches: Sequence[torch.Tensor],
    value_caches: Sequence[torch.Tensor],
    block_mapping: torch.Tensor | Sequence[Sequence[int]],
    dst_key_caches: Sequence[torch.Tensor] | None = None,
    dst_value_caches: Sequence[torch.Tensor] | None = None,
) -> None:
    """Copy block ``block_mapping[i, 0]`` onto block ``block_mapping[i, 1]`` in every cache, or
    from every cache into its destination cache.

    Args:
        key_caches: per-layer key caches, each ``[num_blocks, block_size, num_heads, head_dim]``.
        value_caches: per-layer value caches of the same shape, or empty (MLA).
        block_mapping: ``[num_pairs, 2]`` ints (a tensor on any device, or nested lists); column
            0 indexes the source caches, column 1 the destination caches.
        dst_key_caches, dst_value_caches: where the blocks go, if not the caches themselves:
            one per source cache, ``[num_dst_blocks, block_size, num_heads, head_dim]`` of the
            same dtype (any ``num_dst_blocks``), memory of their own. On a GPU, source or
            destination caches may be in pinned host memory (the kernel reads or writes them
            over PCIe).

    Raises:
        OverlapError: a destination named twice, a block both source and destination of an
            in-place copy, or caches that share memory.
        BlockIdOutOfRangeError, ShapeMismatchError, LengthMismatchError, InvalidArgumentError:
            bad arguments; nothing is written.
    """
    plan_paged(
        key_caches, value_caches, block_mapping, False, dst_key_caches, dst_value_caches
    ).run()


def copy_single_block(
    src_key_cache: torch.Tensor | Sequence[torch.Tensor],
    src_value_cache: torch.Tensor | Sequence[torch.Tensor] | None,
    dst_key_cache: torch.Tensor | Sequence[torch.Tensor],
    dst_value_cache: torch.Tensor | Sequence[torch.Tensor] | None,
    src_block_id: int,
    dst_block_id: int,
) -> None:
    """Copy block ``src_block_id`` of the source caches onto block ``dst_block_id`` of the
    destination caches: :func:`copy_blocks` of one pair.

    Each cache argument is one tensor ``[num_blocks, block_size, num_heads, head_dim]`` (one
    layer) or a sequence of per-layer tensors; the value caches may be None (MLA). Destination
    caches may be the source tensors themselves (then the ids must differ) or other memory.
    """

    def layers(caches) -> list[torch.Tensor]:
        if caches is None:
            return []
        return [caches] if isinstance(caches, torch.Tensor) else list(caches)

    copy_blocks(
        layers(src_key_cache),
        layers(src_value_cache),
        [[src_block_id, dst_block_id]],
        layers(dst_key_cache),
        layers(dst_value_cache),
    )


def swap_blocks(
    key_caches: Sequence[torch.Tensor],
    value_caches: Sequence[torch.Tensor],
    block_mapping: torch.Tensor | Sequence[Sequence[int]],
) -> None:
    """Exchange blocks ``block_mapping[i, 0]`` and ``block_mapping[i, 1]`` in every cache.

    Raises:
        OverlapError: a block named twice anywhere in the mapping (including ``(a, a)``), or
            caches that share memory.
    """
    plan_paged(key_caches, value_caches, block_mapping, swap=True).run()
