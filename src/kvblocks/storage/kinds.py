"""Where a layout's memory lives."""

from __future__ import annotations

from enum import Enum


class StorageKind(Enum):
    """The kinds of storage a layout can live in, fastest first.

    Without a GPU, ``DEVICE`` and ``PINNED`` allocations are plain system memory, so that the
    whole library still works end to end (their ``emulated`` flag says so).
    """

    DEVICE = "device"
    """GPU memory (tier G1)."""
    PINNED = "pinned"
    """Page-locked host memory that GPU kernels and copy engines reach directly (tier G2)."""
    SYSTEM = "system"
    """Pageable host memory: reached from a GPU through a pinned bounce buffer."""
    DISK = "disk"
    """A file on local disk (tier G3)."""
    REMOTE = "remote"
    """Another worker's memory, reached through NIXL (tier G4)."""
