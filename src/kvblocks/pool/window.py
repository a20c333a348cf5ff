"""Prefix hits of sliding-window attention: which cached blocks a hit needs.

A layer with a sliding window of ``W`` tokens computes the token at position ``p`` from the KV
of positions ``p - W + 1`` to ``p``. A prefix of ``n`` whole blocks is therefore a hit when the
blocks holding its last ``W - 1`` tokens are cached, whatever became of the blocks before them::

    W = 9, 4 tokens per block: the last 8 tokens of the prefix, 2 blocks, must be cached

    block      0     1     2     3     4     5
    cached     yes   no    no    yes   yes   no
    hit        |<- skipped ->| |<- held ->|          n = 5 blocks, 3 skipped

These are the rules of vLLM's sliding-window groups, so a hit here is one that engine accepts.
"""

from __future__ import annotations

from collections.abc import Callable


def blocks_needed(sliding_window: int, block_size: int) -> int:
    """Whole blocks before a block boundary that hold its last ``sliding_window - 1`` tokens."""
    return -(-(sliding_window - 1) // block_size)


def window_hit(num_blocks: int, needed: int, cached: Callable[[int], bool]) -> int:
    """How many leading blocks of a prompt a lookup hits, in all.

    Args:
        num_blocks: full blocks of the prompt.
        needed: blocks before the hit's end that must be cached (:func:`blocks_needed`, >= 1).
        cached: whether a tier caches block ``i`` of the prompt; asked from the last block
            back, and no further than the answer needs.

    Returns:
        The end of the last run of ``needed`` cached blocks; where no run is that long, the
        length of the run of cached blocks from the first (a prefix shorter than the window,
        all of it cached).
    """
    run = 0
    for i in range(num_blocks - 1, -1, -1):
        if not cached(i):
            run = 0
            continue
        run += 1
        if run == needed:
            return i + needed
    return run
