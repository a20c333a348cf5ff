"""How many programs a copy or permute kernel launches.

By default a kernel launches one program per chunk (copy) or tile (permute), which suits
device memory: as many loads in flight as the GPU holds. A kernel that reads or writes pinned
host memory waits on PCIe instead, and a few programs, each looping over its share of the
chunks, move as much as one per chunk while the rest of the GPU stays free for the engine's
kernels (``docs/performance.md``, "Transfers while the engine computes").
"""

from __future__ import annotations

from kvblocks.errors import InvalidArgumentError

#: Bytes of pinned host memory the reading programs keep in flight together, and the fewest
#: programs a kernel on pinned memory gets. Measured on the H100 (Llama-3.1-70B blocks): the
#: copy kernel (16 KiB per program) moves as much on 16 programs as on one per chunk and falls
#: to 46 GB/s of 51 on 8; the permute (32 KiB per program at 16 tokens per block) keeps its
#: speed on 8; writers keep theirs on 4 to 8.
PINNED_READ_BYTES = 256 << 10
PINNED_MIN_PROGRAMS = 8


def pinned_programs(reads_host: bool, writes_host: bool, step_bytes: int) -> int | None:
    """The grid cap for a kernel whose programs move ``step_bytes`` each at a time and that
    reads and/or writes pinned host memory; ``None`` (a program per step) for one that
    touches device memory only."""
    if reads_host:
        return max(PINNED_MIN_PROGRAMS, -(-PINNED_READ_BYTES // step_bytes))
    return PINNED_MIN_PROGRAMS if writes_host else None


def grid_size(items: int, programs: int | None) -> int:
    """Programs a kernel over ``items`` chunks or tiles launches: one per item, or at most
    ``programs`` (each then loops over its share)."""
    return items if programs is None else min(items, programs)


def check_programs(programs: int | None) -> None:
    """Raise ``InvalidArgumentError`` unless ``programs`` is a positive int or None."""
    if programs is not None and (
        isinstance(programs, bool) or not isinstance(programs, int) or programs < 1
    ):
        raise InvalidArgumentError("programs", f"must be a positive int or None, got {programs!r}")
