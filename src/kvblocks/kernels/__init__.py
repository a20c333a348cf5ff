"""Layout conversions and copies of KV blocks.

:mod:`kvblocks.kernels.reference` holds the torch references that define every conversion;
:mod:`kvblocks.kernels.reshard` re-slices universal blocks between tensor-parallel degrees.
"""

from kvblocks.kernels.reference import (
    block_from_operational,
    block_from_universal,
    convert_blocks,
    operational_from_block,
    operational_from_universal,
    permute_blocks,
    universal_from_block,
    universal_from_operational,
)
from kvblocks.kernels.reshard import join_heads, reshard_universal, split_heads

__all__ = [
    "block_from_operational",
    "block_from_universal",
    "convert_blocks",
    "join_heads",
    "operational_from_block",
    "operational_from_universal",
    "permute_blocks",
    "reshard_universal",
    "split_heads",
    "universal_from_block",
    "universal_from_operational",
]
