"""Names of registered layouts: handles, worker addresses and tiers."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from kvblocks.errors import InvalidArgumentError

_U64 = (1 << 64) - 1


@dataclass(frozen=True, order=True)
class LayoutHandle:
    """A layout registered with a worker's TransferManager: ``(worker_id, layout_id)``.

    Packs into 128 bits (worker id high, layout id low). A handle names a layout within one
    worker; another worker's handle for the same bytes is a different handle.
    """

    worker_id: int
    layout_id: int

    def __post_init__(self) -> None:
        for name in ("worker_id", "layout_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64:
                raise InvalidArgumentError(name, f"must be an int in [0, 2**64), got {value!r}")

    @property
    def packed(self) -> int:
        """The handle as one 128-bit int."""
        return (self.worker_id << 64) | self.layout_id

    @classmethod
    def from_packed(cls, value: int) -> LayoutHandle:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 128:
            raise InvalidArgumentError("value", f"must be an int in [0, 2**128), got {value!r}")
        return cls(value >> 64, value & _U64)

    def __str__(self) -> str:
        return f"{self.worker_id:x}:{self.layout_id}"


@dataclass(frozen=True)
class WorkerAddress:
    """How other workers reach this one: its id and its NIXL agent's name."""

    worker_id: int
    agent_name: str


class LogicalLayoutHandle(Enum):
    """The tiers: what a layout is for, whatever worker holds it."""

    G1 = "G1"
    """GPU memory."""
    G2 = "G2"
    """Pinned host memory."""
    G3 = "G3"
    """Local disk."""
    G4 = "G4"
    """Remote storage or another worker."""


@dataclass(frozen=True)
class LogicalLayoutDescriptor:
    """A layout handle together with the tier it serves, so that callers can say "G1 -> G2"
    and each worker resolves that to its own handles."""

    handle: LayoutHandle
    tier: LogicalLayoutHandle
