"""Whether a lookup should read a prompt's blocks from disk (G3) or leave them to be computed.

A block that only G3 caches comes back at the disk's pace; on a slow disk, computing its tokens
again can be faster (see "When the disk is slower than computing" in ``docs/pool.md``). Leaving
G3 out ends the hit at the first such block, so every block after it is computed too::

    where    G1  G1  G2  G3  G3  G2  G3  None
                         |<----- computed if G3 is left out ---->|
    read     2 G3 blocks + 1 G2 block          (bytes / the disk's measured rate)
    compute  4 blocks' tokens                  (tokens / the engine's prefill rate)

:func:`skip_slow_disk` weighs the two and gives the ``onboard_from`` to look the prompt up with.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvblocks.errors import InvalidArgumentError
from kvblocks.pool.manager import BlockManager
from kvblocks.pool.tier import Tier

#: ``onboard_from`` without the disk: G2 and the peers.
WITHOUT_DISK = frozenset({Tier.G2, Tier.G4})


def skip_slow_disk(
    manager: BlockManager,
    token_ids: Sequence[int],
    prefill_tokens_per_s: float,
    *,
    salt: int = 0,
) -> frozenset[Tier] | None:
    """The ``onboard_from`` for ``manager.lookup(token_ids, ...)``: :data:`WITHOUT_DISK` where
    reading the prompt's G3 blocks would take longer than computing the tokens from the first
    of them to the end of the cached prefix, else None (every tier).

    The read is timed at the rate that the manager's reads from G3 moved so far
    (``metrics.onboard_rate(Tier.G3, Tier.G2)``); before its first read there is no rate and
    the answer is None, so that the first read measures it. The G2 blocks between the G3 ones
    are not counted (PCIe moves them tens of times faster than a disk).

    Args:
        manager: the manager the prompt will be looked up in.
        token_ids: the prompt.
        prefill_tokens_per_s: how fast the engine computes a prompt's KV, measured on prompts
            of about this length (attention makes longer ones slower per token).
        salt: as for :meth:`BlockManager.lookup`.

    Raises:
        InvalidArgumentError: ``prefill_tokens_per_s`` is not a positive number.
    """
    if (
        isinstance(prefill_tokens_per_s, bool)
        or not isinstance(prefill_tokens_per_s, (int, float))
        or not prefill_tokens_per_s > 0
    ):
        raise InvalidArgumentError(
            "prefill_tokens_per_s", f"must be a positive number, got {prefill_tokens_per_s!r}"
        )
    where = manager.locate(token_ids, salt=salt)
    end = where.index(None) if None in where else len(where)
    if Tier.G3 not in where[:end]:
        return None
    rate = manager.metrics.onboard_rate(Tier.G3, Tier.G2)
    if rate is None:
        return None
    first = where.index(Tier.G3)
    read_s = where[first:end].count(Tier.G3) * manager.block_bytes / rate
    compute_s = (end - first) * manager.config.block_size / prefill_tokens_per_s
    return None if read_s < compute_s else WITHOUT_DISK
