"""Whether a lookup should read a prompt's blocks from disk (G3) and from peers (G4), leave them
to be computed, or split them between computing and reading.

A block that only G3 caches comes back at the disk's pace, a peer's at the network's; where
that is slow, computing its tokens again can be faster (see "When reading is slower than
computing" in ``docs/pool.md``). Leaving G3 out ends the hit at the first such block (or
where the peers' blocks end, if a peer caches the blocks from there), so every block after it
is computed too::

    block    0   1   2   3   4   5   6   7   8
    where    G1  G1  G2  G3  G3  G2  G3  G4  None
                         |<--- computed --->|  if G3 and G4 are left out
    read     blocks 3, 4 and 6 from G3 and  (bytes / each one's measured rate; block 5
             block 7 from a peer             comes from G2 at PCIe's pace, not counted)
    compute  blocks 3 to 7                  (tokens / the engine's prefill rate)

:func:`skip_slow_reads` weighs the ways and gives the ``onboard_from`` to look the prompt up
with.

The reads and the GPU can also work at once: the engine computes the first blocks that only
the disk or a peer (G4, by its news) caches while the manager reads the later ones
(``prefetch(..., first_block=...)``), and the prefix is back when the slower of the two ends.
:func:`read_split` picks the block where the reads start so that both take about as long::

    block    0   1   2   3   4   5   6   7   8   9
    where    G1  G2  G3  G3  G3  G2  G3  G4  G4  None
                     |<- computed ->|<--- read --->|   compute_from 2, read_from 5, end 9

(the disk reads block 6 while a peer's blocks 7 and 8 come in).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from kvblocks.checks import positive_int, positive_number
from kvblocks.pool import prefetch
from kvblocks.pool.manager import BlockManager
from kvblocks.pool.tier import Tier

#: ``onboard_from`` without the disk: G2 and the peers.
WITHOUT_DISK = frozenset({Tier.G2, Tier.G4})
#: ``onboard_from`` without the peers: G2 and the disk.
WITHOUT_PEERS = frozenset({Tier.G2, Tier.G3})
#: Every tier a lookup reads from (``onboard_from=None``).
_EVERY_TIER = frozenset({Tier.G2, Tier.G3, Tier.G4})


def _read_rates(
    manager: BlockManager,
    prefill_tokens_per_s: float,
    disk_bytes_per_s: float | None,
    peer_bytes_per_s: float | None,
) -> dict[Tier, float | None]:
    """Check the rates; then the bytes per second of reads from G3 and from G4: the manager's
    measured so far, else the one given (None where neither is known)."""
    positive_number(prefill_tokens_per_s, "prefill_tokens_per_s")
    given = {Tier.G3: disk_bytes_per_s, Tier.G4: peer_bytes_per_s}
    for tier, name in ((Tier.G3, "disk_bytes_per_s"), (Tier.G4, "peer_bytes_per_s")):
        if given[tier] is not None:
            positive_number(given[tier], name)
    return {t: manager.metrics.onboard_rate(t, Tier.G2) or rate for t, rate in given.items()}


def _local_end(where: Sequence[Tier | None], sources: Collection[Tier]) -> int:
    """Where the local part of a lookup from ``sources`` ends over blocks cached as ``where``
    says: the first block that neither G1, G2 nor (among ``sources``) G3 caches."""
    for i, tier in enumerate(where):
        if tier is None or (tier is Tier.G3 and Tier.G3 not in sources):
            return i
    return len(where)


def _peer_blocks(manager: BlockManager, token_ids: Sequence[int], start: int, salt: int) -> int:
    """How many blocks of ``token_ids`` from block ``start`` on the peer whose news says it
    caches the most of them caches (0 where no news is followed)."""
    if not manager.peers:
        return 0
    counts = manager.peer_prefixes(token_ids, salt=salt, first_block=start).values()
    return max((n for n in counts if n is not None), default=0)


def skip_slow_reads(
    manager: BlockManager,
    token_ids: Sequence[int],
    prefill_tokens_per_s: float,
    *,
    disk_bytes_per_s: float | None = None,
    peer_bytes_per_s: float | None = None,
    salt: int = 0,
) -> frozenset[Tier] | None:
    """The ``onboard_from`` for ``manager.lookup(token_ids, ...)`` that brings the prompt's
    prefix back soonest: None (every tier), or the tiers to read from where reading the
    others would take longer than computing what they hold: :data:`WITHOUT_DISK`,
    :data:`WITHOUT_PEERS` or ``{Tier.G2}``.

    Each way is timed as its lookup would go: the local part (G1, G2, and G3 where read)
    ends at the first block it leaves out, the peers (G4, where read) are asked for the
    blocks after it and bring as many as the news of the one that caches the most says;
    its reads cost ``manager.block_bytes`` a block over the rate that the manager's reads
    from that tier moved so far (``metrics.onboard_rate(Tier.G3, Tier.G2)``, ``(Tier.G4,
    Tier.G2)``), or before its first read the rate given, and the disk's and the peers'
    reads go at once (the lookup takes as long as the slower); the blocks that another way
    would have brought and this one does not are computed at ``prefill_tokens_per_s``.
    The G2 blocks are not counted (PCIe moves them tens of times faster than a disk or a
    network). A tier whose rate is not known yet is read, so that the read measures it;
    peers whose news is not followed are not counted (the lookup still asks them).

    Args:
        manager: the manager the prompt will be looked up in.
        token_ids: the prompt.
        prefill_tokens_per_s: how fast the engine computes a prompt's KV, measured on prompts
            of about this length (attention makes longer ones slower per token).
        disk_bytes_per_s: the disk's read rate, for the lookups before the manager's first
            read from G3 (after a restart, when G1 and G2 are empty: a rate the last process
            measured, or ``kvblocks bench disk``'s); None: read once to measure it.
        peer_bytes_per_s: the peers' read rate before the manager's first read from one
            (``kvblocks bench sharing``'s, say); None: read once to measure it.
        salt: as for :meth:`BlockManager.lookup`.

    Raises:
        InvalidArgumentError: ``prefill_tokens_per_s``, ``disk_bytes_per_s`` or
            ``peer_bytes_per_s`` is not a positive number.
    """
    rates = _read_rates(manager, prefill_tokens_per_s, disk_bytes_per_s, peer_bytes_per_s)
    block_s = {t: 0.0 if r is None else manager.block_bytes / r for t, r in rates.items()}
    where = manager.locate(token_ids, salt=salt)
    peers_from = functools.cache(lambda start: _peer_blocks(manager, token_ids, start, salt))
    ways = {}  # onboard_from -> (the end of its hit, seconds of its reads)
    for sources in (_EVERY_TIER, WITHOUT_PEERS, WITHOUT_DISK, frozenset({Tier.G2})):
        local = _local_end(where, sources)
        at_peers = peers_from(local) if Tier.G4 in sources else 0
        disk_s = where[:local].count(Tier.G3) * block_s[Tier.G3]
        ways[sources] = (local + at_peers, max(disk_s, at_peers * block_s[Tier.G4]))
    furthest = max(end for end, _ in ways.values())
    compute_block_s = manager.config.block_size / prefill_tokens_per_s
    best = min(ways, key=lambda s: ways[s][1] + (furthest - ways[s][0]) * compute_block_s)
    return None if best == _EVERY_TIER else best


@dataclass(frozen=True)
class ReadSplit:
    """Where a prompt's cached prefix is best split between computing and reading it from the
    disk and the peers (:func:`read_split`), in blocks of the prompt.

    Blocks ``[0, compute_from)`` are cached in G1 or G2: a lookup of the prompt with
    ``max_blocks=compute_from, onboard_from=WITHOUT_DISK`` holds them (made before the
    prefetch starts: its reads into a full G2 may evict them). The engine computes the
    blocks ``[compute_from, read_from)`` while ``prefetch(..., first_block=read_from)`` reads
    the G3 blocks of ``[read_from, end)`` and at once the peer's into G2 (and holds the G2 ones
    there); once both are done, a lookup with ``onboard_from={Tier.G2}`` finds the whole
    prefix in G1 and G2. ``read_from == compute_from``: nothing is computed;
    ``read_from == end``: nothing is read.

    Attributes:
        compute_from: the prefix's first block that only G3 or a peer caches (``end`` where
            none).
        read_from: the first block that is read.
        end: the cached prefix's end: the first block that neither a local tier nor (by its
            news) a peer caches, or the prompt's number of full blocks.
        compute_s: the estimated seconds of computing blocks ``[compute_from, read_from)``.
        read_s: the estimated seconds of reading the G3 and G4 blocks of ``[read_from,
            end)``; None where the rate of a tier the prefix would be read from is not known
            yet (then everything is read, to measure it).
    """

    compute_from: int
    read_from: int
    end: int
    compute_s: float
    read_s: float | None


def read_split(
    manager: BlockManager,
    token_ids: Sequence[int],
    prefill_tokens_per_s: float,
    *,
    disk_bytes_per_s: float | None = None,
    peer_bytes_per_s: float | None = None,
    chunk_blocks: int = 1,
    salt: int = 0,
) -> ReadSplit:
    """The :class:`ReadSplit` of ``token_ids``'s cached prefix that brings it back soonest:
    the engine computes its first blocks that only the disk or a peer caches while the
    manager reads the rest, the block where the reads start chosen so that the longer of the
    two is as short as it can be.

    The prefix runs on past the local tiers' part where the news of a peer
    (``add_peer(..., news=True)``) says it caches the blocks after it: those are G4 blocks.
    A block read costs ``manager.block_bytes`` over its tier's rate: the disk's, measured so
    far (``metrics.onboard_rate(Tier.G3, Tier.G2)``) or before the first read
    ``disk_bytes_per_s``; the peers', likewise (``onboard_rate(Tier.G4, Tier.G2)``, else
    ``peer_bytes_per_s``). The prefetch reads the disk's blocks and the peer's at once:
    the longer of the two counts. A computed block costs ``block_size /
    prefill_tokens_per_s``. G2 blocks after ``read_from`` cost nothing (PCIe moves them tens
    of times faster than a disk); those before it are computed with the blocks around them.
    The blocks a prefetch would hold, all but G1's from ``read_from`` on, stay within what
    prefetches may hold (half of G2, :data:`~kvblocks.pool.prefetch.PREFETCH_SHARE`; less if
    other prefetches hold blocks then, and the blocks past it are computed after the lookup).
    While the rate of a tier the prefix would be read from is not known, everything is read,
    so that the read measures it.

    Args:
        manager: the manager the prompt will be looked up in.
        token_ids: the prompt.
        prefill_tokens_per_s: how fast the engine computes a prompt's KV, measured on prompts
            of about this length.
        disk_bytes_per_s: the disk's read rate before the manager's first read from G3;
            None: read once to measure it.
        peer_bytes_per_s: the peers' read rate before the manager's first read from one;
            None: read once to measure it.
        chunk_blocks: the engine computes in chunks of this many blocks (chunked prefill,
            or shapes it has captured or compiled): the computed blocks are a whole number
            of chunks, or everything up to ``end``.
        salt: as for :meth:`BlockManager.lookup`.

    Raises:
        InvalidArgumentError: ``prefill_tokens_per_s``, ``disk_bytes_per_s`` or
            ``peer_bytes_per_s`` is not a positive number, or ``chunk_blocks`` not an
            int >= 1.
    """
    positive_int(chunk_blocks, "chunk_blocks")
    rates = _read_rates(manager, prefill_tokens_per_s, disk_bytes_per_s, peer_bytes_per_s)
    where = manager.locate(token_ids, salt=salt)
    local = _local_end(where, _EVERY_TIER)
    end = local + _peer_blocks(manager, token_ids, local, salt)
    where[local:end] = [Tier.G4] * (end - local)
    first = next((i for i in range(end) if where[i] in (Tier.G3, Tier.G4)), end)
    if any(rates[t] is None for t in rates if t in where[first:end]):
        return ReadSplit(first, first, end, 0.0, None)
    if first == end:
        return ReadSplit(end, end, end, 0.0, 0.0)
    block_s = {t: manager.block_bytes / rate for t, rate in rates.items() if rate is not None}
    compute_block_s = manager.config.block_size / prefill_tokens_per_s
    room = manager.pool(Tier.G2).num_blocks // prefetch.PREFETCH_SHARE  # a prefetch's most
    read_after = {t: [0.0] * (end + 1) for t in rates}  # seconds reading t's blocks of [i, end)
    held_after = [0] * (end + 1)  # blocks of [i, end) not in G1: the prefetch holds them
    for i in range(end - 1, first - 1, -1):
        for tier, seconds in read_after.items():
            seconds[i] = seconds[i + 1] + (block_s[tier] if where[i] is tier else 0.0)
        held_after[i] = held_after[i + 1] + (where[i] is not Tier.G1)

    def read_s(k: int) -> float:  # the disk and the peer read at once
        return max(seconds[k] for seconds in read_after.values())

    best = min(
        [k for k in range(first, end, chunk_blocks) if held_after[k] <= room] + [end],
        key=lambda k: max((k - first) * compute_block_s, read_s(k)),
    )
    return ReadSplit(first, best, end, (best - first) * compute_block_s, read_s(best))
