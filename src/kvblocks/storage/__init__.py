"""Storage: where a layout's bytes live (GPU, pinned or system memory, a file, another worker).

- :class:`StorageKind` and the allocations of each kind (:mod:`~kvblocks.storage.memory`,
  :mod:`~kvblocks.storage.disk`); pinned memory placed on a NUMA node
  (:mod:`~kvblocks.storage.numa`).
- :class:`PhysicalLayout` (a layout plus its storage, built step by step) and :class:`KvBlocks`.
"""

from kvblocks.storage.disk import DiskAllocation
from kvblocks.storage.kinds import StorageKind
from kvblocks.storage.memory import (
    Allocation,
    MemoryAllocation,
    RemoteAllocation,
    allocate_device,
    allocate_pinned,
    allocate_system,
    wrap_tensor,
)
from kvblocks.storage.physical import KvBlocks, PhysicalLayout, PhysicalLayoutBuilder

__all__ = [
    "Allocation",
    "DiskAllocation",
    "KvBlocks",
    "MemoryAllocation",
    "PhysicalLayout",
    "PhysicalLayoutBuilder",
    "RemoteAllocation",
    "StorageKind",
    "allocate_device",
    "allocate_pinned",
    "allocate_system",
    "wrap_tensor",
]
