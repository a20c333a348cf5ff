"""Which blocks a BlockManager writes to disk (G3).

By default every block stored in G2 is also written to G3. A disk has less bandwidth than PCIe
and wears with writes, so a :class:`~kvblocks.pool.BlockManager` can be given an
:class:`OffloadFilter` (``BlockManager(config, disk_filter=...)``) that lets only some blocks
through: :class:`FrequencyFilter` writes a block once its content has been used a given number
of times, so that prefixes seen once (most of a chat's last turn, one-off prompts) stay off the
disk while shared ones go there.

A *use* of a block is one registration of its hash (including a registration that finds the
hash cached already: the engine computed the same block again) or one lookup that finds it in
any tier. The manager reports uses to the filter and asks it before each write to G3; a block
that was kept off the disk is written later, when a use makes it pass (if G2 still holds it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from kvblocks.checks import positive_int


class OffloadFilter(Protocol):
    """Decides which blocks go to disk (see the module documentation). Called under the
    manager's lock: keep both methods quick and do not call back into the manager."""

    def use(self, hashes: Sequence[int]) -> list[int]:
        """Count one use of each of ``hashes``; return those that pass from this use on (the
        manager writes each to G3 if G2 holds it and G3 does not, so returning a hash again is
        harmless)."""

    def passes(self, sequence_hash: int) -> bool:
        """Whether the block with this hash is to be written to disk now."""


class FrequencyFilter:
    """Blocks pass once their hash has been used ``min_uses`` times.

    Counts are kept for the ``max_tracked`` hashes used most recently; a hash forgotten (used
    less recently than that many others) starts counting again. About 100 bytes per tracked
    hash: the default of 1,000,000 hashes takes about 100 MB at most.

    Raises:
        InvalidArgumentError: ``min_uses`` or ``max_tracked`` is not a positive int.
    """

    def __init__(self, min_uses: int = 2, max_tracked: int = 1_000_000) -> None:
        self.min_uses = positive_int(min_uses, "min_uses")
        self.max_tracked = positive_int(max_tracked, "max_tracked")
        self._uses: OrderedDict[int, int] = OrderedDict()

    def use(self, hashes: Sequence[int]) -> list[int]:
        passed = []
        for h in hashes:
            count = self._uses.pop(h, 0) + 1
            self._uses[h] = count
            if count == self.min_uses:
                passed.append(h)
        while len(self._uses) > self.max_tracked:
            self._uses.popitem(last=False)
        return passed

    def passes(self, sequence_hash: int) -> bool:
        return self._uses.get(sequence_hash, 0) >= self.min_uses

    def uses(self, sequence_hash: int) -> int:
        """How many uses of this hash are counted (0 for one never used or forgotten)."""
        return self._uses.get(sequence_hash, 0)

    def __repr__(self) -> str:
        return f"FrequencyFilter(min_uses={self.min_uses}, max_tracked={self.max_tracked})"
