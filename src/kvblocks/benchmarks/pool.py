"""BlockPool speed on the CPU: allocation, registration, prefix lookup, hashing.

Each operation is repeated and its median wall time reported, with the blocks per second that
makes. Runs anywhere (no GPU).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from kvblocks.benchmarks.timing import progress
from kvblocks.pool import BlockPool, sequence_hashes


@dataclass(frozen=True)
class PoolRow:
    operation: str
    blocks: int
    median_us: float
    blocks_per_second: float


def _median_us(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def run(block_size: int = 16, sequence_blocks: int = 1000, batch: int = 64, repeats: int = 200):
    """Rows for: allocate+free of ``batch`` blocks, register of ``sequence_blocks`` blocks,
    match / acquire+free of their prefix, and hashing their tokens."""
    rows = []
    steps = 5

    progress(1, steps, f"allocate + free, batches of {batch}")
    pool = BlockPool(16 * 1024, block_size)

    def allocate_free():
        pool.free(pool.allocate(batch))

    us = _median_us(allocate_free, repeats * 10)
    rows.append(
        PoolRow(f"allocate+free (batch {batch})", batch, round(us, 2), round(batch / us * 1e6))
    )

    tokens = list(range(sequence_blocks * block_size))
    progress(2, steps, f"hash a {sequence_blocks}-block sequence")
    us = _median_us(lambda: sequence_hashes(tokens, block_size), max(10, repeats // 10))
    rows.append(
        PoolRow("sequence_hashes", sequence_blocks, round(us, 1), round(sequence_blocks / us * 1e6))
    )
    hashes = sequence_hashes(tokens, block_size)

    progress(3, steps, f"register {sequence_blocks} blocks")
    big = BlockPool(sequence_blocks, block_size)

    def register_all():
        ids = big.allocate(sequence_blocks)
        for b, h in zip(ids, hashes, strict=True):
            big.fill(b, block_size)
            big.register(b, h)
        big.free(ids)
        big.clear()

    us = _median_us(register_all, max(10, repeats // 10))
    rows.append(
        PoolRow(
            "allocate+fill+register+free",
            sequence_blocks,
            round(us, 1),
            round(sequence_blocks / us * 1e6),
        )
    )

    ids = big.allocate(sequence_blocks)
    for b, h in zip(ids, hashes, strict=True):
        big.fill(b, block_size)
        big.register(b, h)
    big.free(ids)
    progress(4, steps, f"match a {sequence_blocks}-block prefix")
    us = _median_us(lambda: big.match_sequence_hashes(hashes), repeats)
    rows.append(
        PoolRow(
            "match_sequence_hashes",
            sequence_blocks,
            round(us, 1),
            round(sequence_blocks / us * 1e6),
        )
    )

    progress(5, steps, f"share a {sequence_blocks}-block prefix and let it go")

    def hit():
        found = big.match_sequence_hashes(hashes)
        big.acquire(found)
        big.free(found)

    us = _median_us(hit, repeats)
    rows.append(
        PoolRow(
            "match+acquire+free", sequence_blocks, round(us, 1), round(sequence_blocks / us * 1e6)
        )
    )
    return rows
