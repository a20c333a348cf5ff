"""kvblocks: the KV cache of LLM inference engines, managed as blocks.

Subpackages, lowest first (each imports only those below it):

- :mod:`kvblocks.layout`: dims, block formats, layouts and their address tables.
- :mod:`kvblocks.kernels`: layout conversions and copies (torch references; Triton kernels).
- :mod:`kvblocks.storage`: storage kinds, allocations, physical layouts.
- :mod:`kvblocks.transfer`: the TransferManager, moving blocks between any two layouts.
- :mod:`kvblocks.pool`: the block pool, sequence hashes and prefix reuse.
"""

from kvblocks.errors import KvBlocksError
from kvblocks.layout import (
    BlockDim,
    BlockDimension,
    FullyContiguousLayout,
    InnerOrder,
    KvBlockLayout,
    KvDims,
    LayerSeparateLayout,
    Layout,
    LayoutConfig,
    LayoutKind,
    MemoryRegion,
    OuterSeparateLayout,
)

__version__ = "0.1.0"

__all__ = [
    "BlockDim",
    "BlockDimension",
    "FullyContiguousLayout",
    "InnerOrder",
    "KvBlockLayout",
    "KvBlocksError",
    "KvDims",
    "LayerSeparateLayout",
    "Layout",
    "LayoutConfig",
    "LayoutKind",
    "MemoryRegion",
    "OuterSeparateLayout",
    "__version__",
]
