"""One prefix for every group of a hybrid model's layers.

A model that mixes full-attention and sliding-window layers (or windows of several sizes)
keeps one :class:`~kvblocks.pool.BlockManager` per group of layers, each over that group's
cache. A request may reuse a prefix only as long as every group holds it: :func:`lookup_groups`
finds the longest such prefix and returns each group's hit of exactly that length.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace

from kvblocks.errors import InvalidArgumentError
from kvblocks.pool.manager import BlockManager, PrefixHit
from kvblocks.pool.tier import Tier


def lookup_groups(
    managers: Sequence[BlockManager],
    token_ids: Sequence[int],
    *,
    salt: int = 0,
    wait: bool = True,
    onboard_from: Collection[Tier] | None = None,
) -> list[PrefixHit]:
    """Each manager's hit of the longest prefix of ``token_ids`` that all of them hold.

    Full-attention groups are looked up first (their hit bounds the others'), then each window
    group with ``max_blocks`` set to the shortest hit so far. A full-attention hit longer than
    that is cut (the blocks past it freed); a window group's hit cannot be, since its window
    would move back onto blocks it skipped, so such a group is looked up again. Hits only get
    shorter, so this ends; the length it ends at is the longest every group can hit.

    Args:
        managers: one per group of layers, all of one block size.
        token_ids: the prompt.
        salt, wait, onboard_from: as for :meth:`BlockManager.lookup`, in every group (with
            ``wait=False``, wait for each hit's layers on its own ``ready``).

    Returns:
        The hits in the order of ``managers``, each of the same ``num_tokens``; free each
        one's ``block_ids`` with its manager. A cut hit's ``from_tier`` still counts the
        blocks its lookup found.

    Raises:
        InvalidArgumentError: no managers, block sizes that differ, or an argument that
            :meth:`BlockManager.lookup` refuses.
    """
    if not managers:
        raise InvalidArgumentError("managers", "must name at least one BlockManager")
    sizes = {m.config.block_size for m in managers}
    if len(sizes) > 1:
        raise InvalidArgumentError(
            "managers", f"must share one block size, got {sorted(sizes)} tokens per block"
        )
    order = sorted(range(len(managers)), key=lambda i: managers[i].config.sliding_window or 0)
    hits: list[PrefixHit | None] = [None] * len(managers)
    agreed: int | None = None
    try:
        while True:
            for i in order:
                hit, manager = hits[i], managers[i]
                if hit is not None and _blocks(hit) == agreed:
                    continue
                if hit is not None and manager.config.sliding_window is None:
                    hits[i] = _cut(manager, hit, agreed)
                    continue
                if hit is not None:
                    manager.free(hit.block_ids)
                    hits[i] = None
                hits[i] = manager.lookup(
                    token_ids, salt=salt, max_blocks=agreed, wait=wait, onboard_from=onboard_from
                )
                agreed = _blocks(hits[i]) if agreed is None else min(agreed, _blocks(hits[i]))
            if all(_blocks(h) == agreed for h in hits):
                return hits
    except BaseException:
        for manager, hit in zip(managers, hits, strict=True):
            if hit is not None:
                manager.free(hit.block_ids)
        raise


def _blocks(hit: PrefixHit) -> int:
    return hit.skipped + len(hit.block_ids)


def _cut(manager: BlockManager, hit: PrefixHit, blocks: int) -> PrefixHit:
    """A full-attention ``hit`` cut to its first ``blocks`` blocks, the rest freed."""
    manager.free(hit.block_ids[blocks:])
    extra = len(hit.block_ids) - blocks
    return replace(
        hit, block_ids=hit.block_ids[:blocks], hashes=hit.hashes[:blocks], misses=hit.misses + extra
    )
