"""BlockPool speed on the CPU: allocation, registration, prefix lookup, hashing; and the
KvIndex a router keeps: applying stored blocks, and the overlaps of a prompt with 1 and 8
workers that cache it (beside the pool's own prefix match of the same blocks).

Each operation is repeated and its median wall time reported, with the blocks per second that
makes. Runs anywhere (no GPU).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from kvblocks.benchmarks.timing import progress
from kvblocks.pool import BlockPool, BlockStored, EventBatch, KvIndex, Tier, sequence_hashes


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
    steps = 7

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

    progress(6, steps, f"index {sequence_blocks} stored blocks, {batch} per event")
    events = [
        EventBatch(0.0, (BlockStored(tuple(hashes[i : i + batch]), None, (), block_size, Tier.G1),))
        for i in range(0, sequence_blocks, batch)
    ]

    def index_all():
        index = KvIndex(block_size)
        for e in events:
            index.apply("w0", e)

    us = _median_us(index_all, max(10, repeats // 10))
    rows.append(
        PoolRow("KvIndex.apply", sequence_blocks, round(us, 1), round(sequence_blocks / us * 1e6))
    )

    progress(7, steps, f"overlaps of a {sequence_blocks}-block prompt, 1 and 8 workers")
    index = KvIndex(block_size)
    for worker in range(8):
        for e in events:
            index.apply(f"w{worker}", e)
        if worker in (0, 7):
            us = _median_us(lambda: index.overlaps_of(hashes), repeats)
            rows.append(
                PoolRow(
                    f"KvIndex.overlaps_of ({worker + 1} worker{'s' if worker else ''})",
                    sequence_blocks,
                    round(us, 1),
                    round(sequence_blocks / us * 1e6),
                )
            )
    return rows
