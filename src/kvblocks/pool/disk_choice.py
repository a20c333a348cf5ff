"""Whether a lookup should read a prompt's blocks from disk (G3) or leave them to be computed.

A block that only G3 caches comes back at the disk's pace; on a slow disk, computing its tokens
again can be faster (see "When the disk is slower than computing" in ``docs/pool.md``). Leaving
G3 out ends the hit at the first such block, so every block after it is computed too::

    block    0   1   2   3   4   5   6   7
    where    G1  G1  G2  G3  G3  G2  G3  None
                         |<- computed ->|  if G3 is left out
    read     blocks 3, 4 and 6 from G3     (bytes / the disk's measured rate; block 5
                                            comes from G2 at PCIe's pace, not counted)
    compute  blocks 3 to 6                 (tokens / the engine's prefill rate)

:func:`skip_slow_disk` weighs the two and gives the ``onboard_from`` to look the prompt up with.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvblocks.checks import positive_number
from kvblocks.pool.manager import BlockManager
from kvblocks.pool.tier import Tier

#: ``onboard_from`` without the disk: G2 and the peers.
WITHOUT_DISK = frozenset({Tier.G2, Tier.G4})


def skip_slow_disk(
    manager: BlockManager,
    token_ids: Sequence[int],
    prefill_tokens_per_s: float,
    *,
    disk_bytes_per_s: float | None = None,
    salt: int = 0,
) -> frozenset[Tier] | None:
    """The ``onboard_from`` for ``manager.lookup(token_ids, ...)``: :data:`WITHOUT_DISK` where
    reading the prompt's G3 blocks would take longer than computing the tokens from the first
    of them to the end of the cached prefix, else None (every tier).

    The read is timed at the rate that the manager's reads from G3 moved so far
    (``metrics.onboard_rate(Tier.G3, Tier.G2)``), or before its first read at
    ``disk_bytes_per_s``; with neither the answer is None, so that the first read measures
    it. The G2 blocks between the G3 ones are not counted (PCIe moves them tens of times
    faster than a disk).

    Args:
        manager: the manager the prompt will be looked up in.
        token_ids: the prompt.
        prefill_tokens_per_s: how fast the engine computes a prompt's KV, measured on prompts
            of about this length (attention makes longer ones slower per token).
        disk_bytes_per_s: the disk's read rate, for the lookups before the manager's first
            read from G3 (after a restart, when G1 and G2 are empty: a rate the last process
            measured, or ``kvblocks bench disk``'s); None: read once to measure it.
        salt: as for :meth:`BlockManager.lookup`.

    Raises:
        InvalidArgumentError: ``prefill_tokens_per_s`` or ``disk_bytes_per_s`` is not a
            positive number.
    """
    positive_number(prefill_tokens_per_s, "prefill_tokens_per_s")
    if disk_bytes_per_s is not None:
        positive_number(disk_bytes_per_s, "disk_bytes_per_s")
    where = manager.locate(token_ids, salt=salt)
    end = where.index(None) if None in where else len(where)
    if Tier.G3 not in where[:end]:
        return None
    rate = manager.metrics.onboard_rate(Tier.G3, Tier.G2) or disk_bytes_per_s
    if rate is None:
        return None
    first = where.index(Tier.G3)
    read_s = where[first:end].count(Tier.G3) * manager.block_bytes / rate
    compute_s = (end - first) * manager.config.block_size / prefill_tokens_per_s
    return None if read_s < compute_s else WITHOUT_DISK
