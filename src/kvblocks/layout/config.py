"""LayoutConfig: how many blocks a layout holds and how big each region is."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvblocks.checks import positive_int
from kvblocks.errors import InvalidArgumentError, ShapeMismatchError
from kvblocks.layout.dims import KvDims

DTYPE_WIDTHS = (1, 2, 4, 8)


@dataclass(frozen=True)
class LayoutConfig:
    """The sizes a :class:`~kvblocks.layout.Layout` is built from (keyword constructor).

    A layout holds ``num_blocks`` blocks; each block has ``num_layers * outer_dim`` regions of
    ``page_size`` tokens, and each token has ``inner_dim`` elements of ``dtype_width_bytes``
    bytes. ``inner_dim`` is per token (``nh * hd``), not per region: a region is
    ``page_size * inner_dim`` elements, which :class:`KvDims` calls ``inner``.

    Attributes:
        num_blocks: blocks in the layout (``nb`` of the whole layout).
        num_layers: ``nl``.
        outer_dim: ``no``, 2 for K and V.
        page_size: ``nt``, tokens per block.
        inner_dim: elements per token in one region, ``nh * hd``.
        dtype_width_bytes: 1, 2, 4 or 8.
        num_heads: ``nh`` when known; must divide ``inner_dim``. Needed for format changes.
    """

    num_blocks: int
    num_layers: int
    outer_dim: int
    page_size: int
    inner_dim: int
    dtype_width_bytes: int
    num_heads: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_blocks", "num_layers", "outer_dim", "page_size", "inner_dim"):
            positive_int(getattr(self, name), name)
        if self.dtype_width_bytes not in DTYPE_WIDTHS or isinstance(self.dtype_width_bytes, bool):
            raise InvalidArgumentError(
                "dtype_width_bytes",
                f"must be one of {DTYPE_WIDTHS}, got {self.dtype_width_bytes!r}",
            )
        if self.num_heads is not None:
            positive_int(self.num_heads, "num_heads")
            if self.inner_dim % self.num_heads:
                raise InvalidArgumentError(
                    "num_heads",
                    f"must divide inner_dim ({self.inner_dim}) into whole heads,"
                    f" got {self.num_heads}",
                )

    @classmethod
    def from_dims(cls, dims: KvDims, num_blocks: int) -> LayoutConfig:
        """The config of a layout holding ``num_blocks`` blocks of ``dims``."""
        return cls(
            num_blocks=num_blocks,
            num_layers=dims.nl,
            outer_dim=dims.no,
            page_size=dims.nt,
            inner_dim=dims.nh * dims.hd,
            dtype_width_bytes=dims.itemsize,
            num_heads=dims.nh,
        )

    def dims(self, dtype: torch.dtype | str) -> KvDims:
        """The :class:`KvDims` of one block of this config, with elements of ``dtype``.

        Raises:
            InvalidArgumentError: ``num_heads`` is not set.
            ShapeMismatchError: ``dtype``'s width differs from ``dtype_width_bytes``.
        """
        if self.num_heads is None:
            raise InvalidArgumentError("num_heads", "must be set to split inner_dim into heads")
        dims = KvDims(
            nl=self.num_layers,
            no=self.outer_dim,
            nh=self.num_heads,
            nt=self.page_size,
            hd=self.inner_dim // self.num_heads,
            dtype=dtype,
        )
        if dims.itemsize != self.dtype_width_bytes:
            raise ShapeMismatchError(
                "dtype",
                f"is {dims.itemsize} bytes wide but the config says {self.dtype_width_bytes}",
            )
        return dims

    @property
    def region_bytes(self) -> int:
        """Bytes in one ``(block, layer, outer)`` region."""
        return self.page_size * self.inner_dim * self.dtype_width_bytes

    @property
    def block_bytes(self) -> int:
        """Bytes in one block (all its regions)."""
        return self.num_layers * self.outer_dim * self.region_bytes

    @property
    def total_bytes(self) -> int:
        """Bytes in all ``num_blocks`` blocks."""
        return self.num_blocks * self.block_bytes
