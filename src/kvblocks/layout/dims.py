"""KvDims: the sizes of one KV block and the byte counts derived from them."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kvblocks.checks import positive_int
from kvblocks.errors import LayoutFormatError
from kvblocks.layout.block_format import BlockDim, InnerOrder, KvBlockLayout
from kvblocks.layout.dtypes import parse_dtype


@dataclass(frozen=True)
class KvDims:
    """Sizes of a KV block.

    Attributes:
        nl: layers.
        no: outer chunks per layer (2 for K and V; 1 for MLA's latent cache).
        nh: KV heads (on this rank).
        nt: tokens per block.
        hd: head dimension, in elements.
        dtype: element type (a torch dtype or a name such as ``"bf16"``; stored as a dtype).
    """

    nl: int
    no: int
    nh: int
    nt: int
    hd: int
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        for name in ("nl", "no", "nh", "nt", "hd"):
            positive_int(getattr(self, name), name)
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return self.dtype.itemsize

    @property
    def inner(self) -> int:
        """Elements in one ``(layer, outer)`` region: ``nt * nh * hd``."""
        return self.nt * self.nh * self.hd

    @property
    def region_bytes(self) -> int:
        """Bytes in one ``(layer, outer)`` region."""
        return self.inner * self.itemsize

    @property
    def block_elems(self) -> int:
        """Elements in one block: ``nl * no * inner``."""
        return self.nl * self.no * self.inner

    @property
    def block_bytes(self) -> int:
        """Bytes in one block."""
        return self.block_elems * self.itemsize

    @property
    def token_bytes(self) -> int:
        """Bytes one token occupies across all layers, K and V."""
        return self.block_bytes // self.nt

    def size(self, dim: BlockDim) -> int:
        """The extent of one of the four permutable dims."""
        return {
            BlockDim.LAYER: self.nl,
            BlockDim.OUTER: self.no,
            BlockDim.PAGE: self.nt,
            BlockDim.HEAD: self.nh,
        }[dim]

    def region_shape(self, order: InnerOrder) -> tuple[int, int, int]:
        """Shape of one region: ``(nt, nh, hd)`` for NHD, ``(nh, nt, hd)`` for HND."""
        if order is InnerOrder.NHD:
            return (self.nt, self.nh, self.hd)
        return (self.nh, self.nt, self.hd)

    def block_shape(self, fmt: KvBlockLayout) -> tuple[int, int, int, int, int]:
        """The 5-d logical shape of one block in ``fmt``, e.g. ``(nh, nl, no, nt, hd)`` for
        ``UniversalTP``.

        Raises:
            LayoutFormatError: ``fmt`` is ``Unknown`` (it has no shape).
        """
        if fmt.dim_order is None:
            raise LayoutFormatError("fmt", f"must state its dimension order, got {fmt.name}")
        a, b, c, d = (self.size(dim) for dim in fmt.dim_order)
        return (a, b, c, d, self.hd)

    def with_heads(self, nh: int) -> KvDims:
        """The same dims with another head count (a tensor-parallel shard's view)."""
        return replace(self, nh=nh)
