"""Block formats: the order of dimensions inside one KV block.

A block holds ``nl * no * nt * nh * hd`` elements. Its format says in which order the four
dimensions layer (``nl``), outer (``no``, K and V), page/tokens (``nt``) and head (``nh``)
are laid out, outermost first; the head dimension ``hd`` is always innermost.

=================  ============================  =========================================
format             one block                     used by
=================  ============================  =========================================
OperationalNHD     ``[nl, no, nt, nh, hd]``      vLLM-style paged caches (inner ``[nt, nh, hd]``)
OperationalHND     ``[nl, no, nh, nt, hd]``      engines with head-major pages
UniversalTP        ``[nh, nl, no, nt, hd]``      storage: a TP reshard is a slice along ``nh``
UniversalPP        ``[nl, nh, no, nt, hd]``      storage for pipeline-parallel: layers outermost
Custom(order)      ``[*order, hd]``              any other permutation of the four
Unknown            (none)                        bytes whose order nobody stated
=================  ============================  =========================================
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import ClassVar

from kvblocks.errors import LayoutFormatError

_log = logging.getLogger(__name__)
_warned_unknown = False


class BlockDim(Enum):
    """One of the four permutable dimensions of a block (``hd`` is always innermost)."""

    LAYER = "nl"
    OUTER = "no"
    PAGE = "nt"
    HEAD = "nh"

    def __str__(self) -> str:
        return self.value


DimOrder = tuple[BlockDim, BlockDim, BlockDim, BlockDim]


class InnerOrder(IntEnum):
    """The order inside one ``(layer, outer)`` region of ``nt * nh * hd`` elements.

    The integer values are the seed API's ``layout_value``.
    """

    NHD = 0
    """``[nt, nh, hd]``: token-major."""
    HND = 1
    """``[nh, nt, hd]``: head-major."""

    @property
    def operational(self) -> KvBlockLayout:
        """The operational block format whose regions have this inner order."""
        return (
            KvBlockLayout.OperationalNHD if self is InnerOrder.NHD else KvBlockLayout.OperationalHND
        )


@dataclass(frozen=True)
class KvBlockLayout:
    """A block format: a name and its dimension order (``None`` when unknown).

    Use the named formats (``KvBlockLayout.OperationalNHD`` ...) or ``KvBlockLayout.Custom(order)``.
    """

    name: str
    dim_order: DimOrder | None

    OperationalNHD: ClassVar[KvBlockLayout]
    OperationalHND: ClassVar[KvBlockLayout]
    UniversalTP: ClassVar[KvBlockLayout]
    UniversalPP: ClassVar[KvBlockLayout]
    Unknown: ClassVar[KvBlockLayout]

    @staticmethod
    def Custom(order: tuple[BlockDim, ...] | list[BlockDim]) -> KvBlockLayout:  # noqa: N802
        """A format with an explicit order of the four dims, outermost first.

        Raises:
            LayoutFormatError: ``order`` is not a permutation of the four :class:`BlockDim`.
        """
        order = tuple(order)
        if not all(isinstance(d, BlockDim) for d in order) or sorted(
            order, key=lambda d: d.value
        ) != sorted(BlockDim, key=lambda d: d.value):
            raise LayoutFormatError(
                "order", f"must be a permutation of {[str(d) for d in BlockDim]}, got {order!r}"
            )
        return KvBlockLayout("custom", order)  # type: ignore[arg-type]

    @staticmethod
    def from_name(name: str) -> KvBlockLayout:
        """Parse a named format (``"operational_nhd"``, ``"universal_tp"`` ...; not custom)."""
        for fmt in NAMED_FORMATS:
            if fmt.name == name.strip().lower():
                return fmt
        names = ", ".join(f.name for f in NAMED_FORMATS)
        raise LayoutFormatError("name", f"must be one of {names}, got {name!r}")

    def requires_transform(self, other: KvBlockLayout) -> bool:
        """Whether moving blocks from this format to ``other`` needs a permute, not a copy.

        Two known formats need one when their orders differ. A known and an unknown format
        conservatively do. Two unknown formats do not (bytes are copied as they are), which
        is logged as a warning, once per process, because the caller should say what the
        bytes are.
        """
        if self.dim_order is None and other.dim_order is None:
            global _warned_unknown
            if not _warned_unknown:
                _warned_unknown = True
                _log.warning(
                    "moving blocks between two Unknown block formats: their bytes are copied as"
                    " they are (say which format they are in to silence this; said once)"
                )
            return False
        return self.dim_order != other.dim_order

    def is_operational(self) -> bool:
        """``OperationalNHD`` or ``OperationalHND``: layer and outer outermost."""
        return self in (KvBlockLayout.OperationalNHD, KvBlockLayout.OperationalHND)

    def is_universal(self) -> bool:
        """``UniversalTP`` or ``UniversalPP``: the storage formats."""
        return self in (KvBlockLayout.UniversalTP, KvBlockLayout.UniversalPP)

    @property
    def inner_order(self) -> InnerOrder | None:
        """The region order of an operational format; ``None`` for every other format."""
        if self == KvBlockLayout.OperationalNHD:
            return InnerOrder.NHD
        if self == KvBlockLayout.OperationalHND:
            return InnerOrder.HND
        return None

    def __str__(self) -> str:
        if self.dim_order is None:
            return self.name
        return f"{self.name} [{', '.join(str(d) for d in self.dim_order)}, hd]"


_L, _O, _P, _H = BlockDim.LAYER, BlockDim.OUTER, BlockDim.PAGE, BlockDim.HEAD
KvBlockLayout.OperationalNHD = KvBlockLayout("operational_nhd", (_L, _O, _P, _H))
KvBlockLayout.OperationalHND = KvBlockLayout("operational_hnd", (_L, _O, _H, _P))
KvBlockLayout.UniversalTP = KvBlockLayout("universal_tp", (_H, _L, _O, _P))
KvBlockLayout.UniversalPP = KvBlockLayout("universal_pp", (_L, _H, _O, _P))
KvBlockLayout.Unknown = KvBlockLayout("unknown", None)

#: Every format with a fixed name, in the order they are listed to users.
NAMED_FORMATS: tuple[KvBlockLayout, ...] = (
    KvBlockLayout.OperationalNHD,
    KvBlockLayout.OperationalHND,
    KvBlockLayout.UniversalTP,
    KvBlockLayout.UniversalPP,
    KvBlockLayout.Unknown,
)
