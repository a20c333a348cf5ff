"""The block pool: which blocks exist, who holds them, and which contents they cache.

- :mod:`~kvblocks.pool.hashing`: sequence hashes, deterministic across processes and machines.
- :class:`BlockPool`: allocation, sharing, registration, prefix lookup and LRU eviction.
"""

from kvblocks.pool.block_pool import BlockPool, BlockState, BlockStateError, PoolExhaustedError
from kvblocks.pool.hashing import HASH_KEY, ROOT_HASH, block_hash, root_hash, sequence_hashes

__all__ = [
    "HASH_KEY",
    "ROOT_HASH",
    "BlockPool",
    "BlockState",
    "BlockStateError",
    "PoolExhaustedError",
    "block_hash",
    "root_hash",
    "sequence_hashes",
]
