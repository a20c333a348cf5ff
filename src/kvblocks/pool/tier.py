"""The memory tiers a block can be cached in."""

from __future__ import annotations

from enum import Enum


class Tier(Enum):
    """Where a cached block lives. The value is the ``medium`` named in KV events."""

    G1 = "GPU"
    """Device memory the engine computes in (system memory on a machine without a GPU)."""
    G2 = "CPU"
    """Pinned host memory."""
    G3 = "DISK"
    """A file on local disk."""
    G4 = "REMOTE"
    """Another worker's G2, read through NIXL. Blocks read from it are cached in this worker's
    G2, so G4 shows only in hit counts and transfer metrics, never in KV events."""

    @property
    def medium(self) -> str:
        return self.value
