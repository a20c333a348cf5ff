"""Layout math: block dims, block formats, layout configs and region addresses.

Pure arithmetic; it uses torch only for its dtypes and never touches memory.
"""

from kvblocks.layout.block_format import NAMED_FORMATS, BlockDim, InnerOrder, KvBlockLayout
from kvblocks.layout.config import LayoutConfig
from kvblocks.layout.dims import KvDims
from kvblocks.layout.dtypes import DTYPES, dtype_name, parse_dtype
from kvblocks.layout.layouts import (
    BlockDimension,
    FullyContiguousLayout,
    LayerSeparateLayout,
    Layout,
    LayoutKind,
    MemoryRegion,
    OuterSeparateLayout,
    check_stored_format,
    layer_range,
)

__all__ = [
    "DTYPES",
    "NAMED_FORMATS",
    "BlockDim",
    "BlockDimension",
    "FullyContiguousLayout",
    "InnerOrder",
    "KvBlockLayout",
    "KvDims",
    "LayerSeparateLayout",
    "Layout",
    "LayoutConfig",
    "LayoutKind",
    "MemoryRegion",
    "OuterSeparateLayout",
    "check_stored_format",
    "dtype_name",
    "layer_range",
    "parse_dtype",
]
