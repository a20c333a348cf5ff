"""Layout conversions and copies of KV blocks: Triton kernels beside their torch references.

Every kernel takes flat tables of raw addresses (see :mod:`kvblocks.layout`), checks its
arguments before it launches, and runs on the GPU (Triton), on the CPU under Triton's
interpreter, or through the torch reference; :func:`available` says which.

- :mod:`~kvblocks.kernels.permutes`: block stack / operational / universal conversions.
- :mod:`~kvblocks.kernels.copy`: ``vectorized_copy`` over pointer pairs.
- :mod:`~kvblocks.kernels.grid`: how many programs a kernel launches (few for pinned memory).
- :mod:`~kvblocks.kernels.memcpy`: ``memcpy_batch`` through the copy engines.
- :mod:`~kvblocks.kernels.paged`: ``copy_blocks`` / ``copy_single_block`` / ``swap_blocks`` on
  paged caches.
- :mod:`~kvblocks.kernels.reference`, :mod:`~kvblocks.kernels.reshard`: torch references and
  tensor-parallel resharding.
"""

from kvblocks.kernels.backend import Backend, available, is_stub_build
from kvblocks.kernels.copy import CopyPlan, plan_copy, vectorized_copy
from kvblocks.kernels.grid import pinned_programs
from kvblocks.kernels.memcpy import (
    MemcpyPlan,
    has_memcpy_batch_async,
    memcpy_batch,
    memcpy_per_pair,
    plan_memcpy,
)
from kvblocks.kernels.paged import (
    PagedPlan,
    copy_blocks,
    copy_single_block,
    plan_paged,
    swap_blocks,
)
from kvblocks.kernels.permutes import (
    Operand,
    PermutePlan,
    block_from_operational,
    block_from_universal,
    operational_from_block,
    operational_from_universal,
    permute,
    plan_permute,
    universal_from_block,
    universal_from_operational,
)
from kvblocks.kernels.reshard import join_heads, reshard_universal, split_heads
from kvblocks.kernels.staged import StagedPlan, plan_staged_h2d

__all__ = [
    "Backend",
    "CopyPlan",
    "MemcpyPlan",
    "Operand",
    "PagedPlan",
    "PermutePlan",
    "StagedPlan",
    "available",
    "block_from_operational",
    "block_from_universal",
    "copy_blocks",
    "copy_single_block",
    "has_memcpy_batch_async",
    "is_stub_build",
    "join_heads",
    "memcpy_batch",
    "memcpy_per_pair",
    "operational_from_block",
    "operational_from_universal",
    "permute",
    "pinned_programs",
    "plan_copy",
    "plan_memcpy",
    "plan_paged",
    "plan_permute",
    "plan_staged_h2d",
    "reshard_universal",
    "split_heads",
    "swap_blocks",
    "universal_from_block",
    "universal_from_operational",
    "vectorized_copy",
]
