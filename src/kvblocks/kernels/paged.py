"""copy_blocks / swap_blocks on an engine's paged KV cache.

The cache is one tensor per layer for keys and one for values, each
``[num_blocks, block_size, num_heads, head_dim]`` (any contiguous shape whose first dim is the
block works). ``block_mapping`` is ``[num_pairs, 2]``:

- :func:`copy_blocks`: block ``mapping[i, 0]`` is copied onto block ``mapping[i, 1]`` in every
  key and value cache (prefix sharing, copy on write).
- :func:`swap_blocks`: blocks ``mapping[i, 0]`` and ``mapping[i, 1]`` exchange contents in place.

One launch covers every pair and every cache. Pairs run concurrently, so a mapping whose result
would depend on their order is rejected: for copies, a destination named twice or a block that is
both a source and a destination; for swaps, any block named twice.

References: :func:`copy_blocks_reference`, :func:`swap_blocks_reference`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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

#: Bytes of one block that one program moves; tuned on the H100 by bench/tune.py.
TILE_BYTES = 8192
NUM_WARPS = 8


@triton.jit
def _paged_kernel(
    cache_table,
    mapping,
    num_pairs,
    tiles,
    BLOCK_WORDS: tl.constexpr,
    WORD: tl.constexpr,
    ALIGN: tl.constexpr,
    TILE: tl.constexpr,
    SWAP: tl.constexpr,
):
    # Caches vary slowest, so the programs in flight at once touch few of the cache tensors.
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % tiles
    rest = pid // tiles
    pair = rest % num_pairs
    cache = rest // num_pairs
    base = tl.load(cache_table + cache).to(tl.pointer_type(WORD))
    base = tl.multiple_of(base, ALIGN)
    a = tl.load(mapping + 2 * pair)
    b = tl.load(mapping + 2 * pair + 1)
    offs = tile * TILE + tl.arange(0, TILE)
    ptr_a = base + a * BLOCK_WORDS + offs
    ptr_b = base + b * BLOCK_WORDS + offs
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


def copy_blocks_reference(caches: Sequence[torch.Tensor], mapping: torch.Tensor) -> None:
    """``cache[mapping[i, 1]] = cache[mapping[i, 0]]`` for every cache and pair."""
    src, dst = mapping[:, 0].to(torch.long), mapping[:, 1].to(torch.long)
    for cache in caches:
        cache[dst] = cache[src]


def swap_blocks_reference(caches: Sequence[torch.Tensor], mapping: torch.Tensor) -> None:
    """Exchange ``cache[mapping[i, 0]]`` and ``cache[mapping[i, 1]]`` for every cache and pair."""
    a, b = mapping[:, 0].to(torch.long), mapping[:, 1].to(torch.long)
    for cache in caches:
        first, second = cache[a].clone(), cache[b].clone()
        cache[a] = second
        cache[b] = first


def _check_caches(key_caches, value_caches) -> list[torch.Tensor]:
    if isinstance(key_caches, torch.Tensor) or isinstance(value_caches, torch.Tensor):
        raise InvalidArgumentError(
            "key_caches", "and value_caches must be sequences of per-layer tensors"
        )
    keys, values = list(key_caches), list(value_caches)
    if not keys:
        raise LengthMismatchError("key_caches", "must hold at least one cache tensor")
    if values and len(values) != len(keys):
        raise LengthMismatchError(
            "value_caches",
            f"must hold {len(keys)} tensors like key_caches (or none), got {len(values)}",
        )
    caches = keys + values
    first = caches[0]
    for i, cache in enumerate(caches):
        name = f"key_caches[{i}]" if i < len(keys) else f"value_caches[{i - len(keys)}]"
        if not isinstance(cache, torch.Tensor):
            raise InvalidArgumentError(name, f"must be a torch.Tensor, got {type(cache).__name__}")
        if cache.dim() < 2 or not cache.is_contiguous():
            raise ShapeMismatchError(name, "must be contiguous with the block index as dim 0")
        if cache.shape != first.shape or cache.dtype != first.dtype or cache.device != first.device:
            raise ShapeMismatchError(
                name,
                f"is {cache.dtype} {list(cache.shape)} on {cache.device}, key_caches[0] is"
                f" {first.dtype} {list(first.shape)} on {first.device}",
            )
    return caches


def _check_mapping(block_mapping, num_blocks: int, swap: bool) -> torch.Tensor:
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
    bad = (mapping < 0) | (mapping >= num_blocks)
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0])
        raise BlockIdOutOfRangeError(
            f"block_mapping[{i}, {j}]", f"must be in [0, {num_blocks}), got {int(mapping[i, j])}"
        )
    if swap:
        dup = first_repeat(mapping.flatten().tolist())
        if dup is not None:
            raise OverlapError(
                "block_mapping",
                f"names block {dup} twice; each block may take part in one swap only",
            )
    else:
        src, dst = mapping[:, 0], mapping[:, 1]
        dup = first_repeat(dst.tolist())
        if dup is not None:
            raise OverlapError("block_mapping", f"writes block {dup} twice (column 1 repeats)")
        both = torch.isin(dst, src)
        if bool(both.any()):
            block = int(dst[both][0])
            raise OverlapError(
                "block_mapping",
                f"uses block {block} as both a source and a destination; copy in two calls",
            )
    return mapping


@dataclass(frozen=True)
class PagedPlan:
    """A validated copy_blocks or swap_blocks, ready to run any number of times.

    The caches and mapping are fixed at planning; :meth:`run` is one launch (or the reference
    on a device without kernels), with no checks and no host-device synchronization.
    """

    caches: tuple[torch.Tensor, ...]
    mapping: torch.Tensor
    swap: bool
    backend: Backend
    cache_table: torch.Tensor
    block_words: int
    align: int

    def run(self) -> None:
        if self.mapping.shape[0] == 0:
            return
        if self.backend is Backend.REFERENCE:
            (swap_blocks_reference if self.swap else copy_blocks_reference)(
                self.caches, self.mapping
            )
            return
        word_bytes = min(self.align, 4)
        tile = min(TILE_BYTES // word_bytes, 1 << (self.block_words - 1).bit_length())
        tiles = triton.cdiv(self.block_words, tile)
        pairs = self.mapping.shape[0]
        with LAUNCH_LOCK:
            _paged_kernel[(pairs * len(self.caches) * tiles,)](
                self.cache_table,
                self.mapping,
                pairs,
                tiles,
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
) -> PagedPlan:
    """Check the caches and the mapping of a copy_blocks (or, with ``swap``, swap_blocks)."""
    caches = _check_caches(key_caches, value_caches)
    first = caches[0]
    mapping = _check_mapping(block_mapping, first.shape[0], swap)
    # Pairs are independent; in source order neighbouring programs read neighbouring blocks.
    mapping = mapping[torch.argsort(mapping[:, 0])].to(first.device)
    backend = available(first.device)
    block_bytes = first[0].numel() * first.element_size()
    bases = torch.tensor([c.data_ptr() for c in caches], dtype=torch.int64)
    align = common_alignment(bases, block_bytes)
    return PagedPlan(
        tuple(caches),
        mapping,
        swap,
        backend,
        bases.to(first.device),
        block_bytes // min(align, 4),
        align,
    )


def copy_blocks(
    key_caches: Sequence[torch.Tensor],
    value_caches: Sequence[torch.Tensor],
    block_mapping: torch.Tensor | Sequence[Sequence[int]],
) -> None:
    """Copy block ``block_mapping[i, 0]`` onto block ``block_mapping[i, 1]`` in every cache.

    Args:
        key_caches: per-layer key caches, each ``[num_blocks, block_size, num_heads, head_dim]``.
        value_caches: per-layer value caches of the same shape, or empty (MLA).
        block_mapping: ``[num_pairs, 2]`` ints (a tensor on any device, or nested lists).

    Raises:
        OverlapError: a destination named twice, or a block both source and destination.
        BlockIdOutOfRangeError, ShapeMismatchError, LengthMismatchError: bad arguments; nothing
            is written.
    """
    plan_paged(key_caches, value_caches, block_mapping, swap=False).run()


def swap_blocks(
    key_caches: Sequence[torch.Tensor],
    value_caches: Sequence[torch.Tensor],
    block_mapping: torch.Tensor | Sequence[Sequence[int]],
) -> None:
    """Exchange blocks ``block_mapping[i, 0]`` and ``block_mapping[i, 1]`` in every cache.

    Raises:
        OverlapError: a block named twice anywhere in the mapping (including ``(a, a)``).
    """
    plan_paged(key_caches, value_caches, block_mapping, swap=True).run()
