"""Onboarding: copying the blocks of a prefix that G2 or G3 cache back into G1 for a
``BlockManager`` lookup. G3 blocks go through G2 staging blocks and are checked against G3's
journal on the way (a corrupted block is dropped and counts as a miss); G2 blocks are copied
into G1 in groups of layers, and the copies may still run when :meth:`Onboarder.onboard`
returns (:class:`~kvblocks.pool.inflight.InFlightCopies` holds their blocks until they end).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from kvblocks.pool.inflight import InFlight, InFlightCopies, wait_quietly
from kvblocks.pool.ready import LayerCopies
from kvblocks.pool.tier import Tier
from kvblocks.pool.tier_set import TierSet
from kvblocks.transfer import (
    StreamEvent,
    TransferCompleteNotification,
    TransferManager,
    TransferOptions,
    block_checksums,
    wait_for,
)

log = logging.getLogger("kvblocks.pool")

#: G3 blocks are staged through G2 in rounds of up to a ``1 / STAGING_SHARE`` of G2's blocks
#: where the G2 blocks that a lookup holds would leave less room (see
#: :meth:`Onboarder._leave_room_to_stage`).
STAGING_SHARE = 4
#: G3 blocks are read in chunks of about this many bytes (at least one block), each checked
#: while the next ones are read.
READ_CHUNK_BYTES = 64 << 20
#: Chunks read ahead of the one being checked.
READ_AHEAD = 2


@dataclass
class _Plan:
    """A planned onboard: held sources in G2 or G3, and the G1 destinations (held)."""

    blocks: list[tuple[Tier, int]]
    dst: list[int]


class Onboarder:
    """Copies of cached blocks into G1 for one manager's lookups.

    Args:
        tiers: the manager's tiers; G2 and G3 are used where present.
        inflight: takes the copies into G1 that may still run.
        transfer: the manager's TransferManager (G2 -> G1 copies are issued on it directly,
            in layer groups).
        device: where G1 lives; on a GPU, copies into G1 run on a stream of their own.
    """

    def __init__(
        self,
        tiers: TierSet,
        inflight: InFlightCopies,
        transfer: TransferManager,
        device: torch.device,
    ) -> None:
        self._tiers = tiers
        self._inflight = inflight
        self._transfer = transfer
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def onboard(
        self,
        hashes: list[int],
        fetched: Mapping[int, int],
        from_tier: dict[Tier, int],
        groups: tuple[range, ...],
        sources: frozenset[Tier],
    ) -> list[int]:
        """Copy into G1 the leading blocks of ``hashes`` that the tiers of ``sources`` (G2,
        G3; G4 for the ``fetched`` ones, read from a peer into G2 a moment ago) cache, as far
        as G1 has room, G2's in layer ``groups``; returns the G1 blocks (held) and counts each
        in ``from_tier`` by the tier it came from."""
        with self._tiers.lock:
            plan = self._plan(hashes, fetched, sources)
        if not plan.blocks:
            return []
        onboarded = self._carry_out(hashes[: len(plan.blocks)], plan, groups)
        for h, (tier, _) in zip(hashes, plan.blocks[: len(onboarded)], strict=False):
            source = Tier.G4 if h in fetched else tier
            from_tier[source] = from_tier.get(source, 0) + 1
        return onboarded

    def _plan(
        self, hashes: list[int], fetched: Mapping[int, int], sources: frozenset[Tier]
    ) -> _Plan:
        """Plan copying the prefix of ``hashes`` that the tiers of ``sources`` cache into G1
        (as :meth:`onboard` says), as far as G1 has room: the sources are acquired and the G1
        destinations allocated. Under the lock."""
        pools = [
            (tier, state.pool, tier in sources)
            for tier in (Tier.G2, Tier.G3)
            if (state := self._tiers.get(tier)) is not None
        ]
        found: list[tuple[Tier, int]] = []
        for h in hashes:
            for tier, pool, allowed in pools:
                if allowed or (tier is Tier.G2 and h in fetched):
                    block = pool.lookup(h)
                    if block is not None:
                        found.append((tier, block))
                        break
            else:
                break
        found = found[: self._tiers[Tier.G1].pool.num_available]
        for tier in (Tier.G2, Tier.G3):
            blocks = [b for t, b in found if t is tier]
            if blocks:
                self._tiers[tier].pool.acquire(blocks)
        found = self._leave_room_to_stage(hashes, found, sources)
        return _Plan(found, self._tiers[Tier.G1].pool.allocate(len(found)))

    def _leave_room_to_stage(
        self, hashes: list[int], found: list[tuple[Tier, int]], sources: frozenset[Tier]
    ) -> list[tuple[Tier, int]]:
        """The planned sources ``found`` (held), changed so that G2 has room to stage the G3
        blocks among them: where the G2 blocks held for the plan (a long prompt's last blocks,
        say, when G2 holds nothing else) leave G2 fewer free or evictable blocks than a round
        of staging needs, G2 blocks are let go from the end of the plan, each read from G3
        instead where G3 caches it (and ``sources`` names G3), else the plan ends before it.
        Under the lock."""
        g3_count = sum(t is Tier.G3 for t, _ in found)
        if not g3_count:
            return found
        g2, g3 = self._tiers[Tier.G2].pool, self._tiers[Tier.G3].pool
        wanted = min(g3_count, max(1, g2.num_blocks // STAGING_SHARE))
        i = len(found)
        while g2.num_available < wanted and i > 0:
            i -= 1
            tier, block = found[i]
            if tier is not Tier.G2 or g2.refcount(block) > 1:  # letting go frees no room
                continue
            g2.free([block])
            disk = g3.lookup(hashes[i]) if Tier.G3 in sources else None
            if disk is None:
                for t, b in found[i + 1 :]:
                    self._tiers[t].pool.free([b])
                found = found[:i]
                continue
            g3.acquire([disk])
            found[i] = (Tier.G3, disk)
        return found

    def _carry_out(self, hashes: list[int], plan: _Plan, groups: tuple[range, ...]) -> list[int]:
        """Carry out ``plan``: G3 blocks into G2 staging blocks (checked; in rounds as large as
        G2 has room for), G2 blocks and the last round's staging blocks into G1, issued in
        layer ``groups`` and held until they end (:class:`~kvblocks.pool.inflight.InFlightCopies`);
        the staging blocks of earlier rounds go into G1 before the next round takes G2's room.
        Returns the G1 blocks (held), fewer than planned if a G3 block fails its checksum."""
        sources, dst = plan.blocks, plan.dst
        g1, g2 = self._tiers[Tier.G1].pool, self._tiers[Tier.G2].pool
        g3_at = [i for i, (t, _) in enumerate(sources) if t is Tier.G3]
        g2_at = [i for i, (t, _) in enumerate(sources) if t is Tier.G2]
        keep, done = len(sources), 0
        staged: dict[int, int] = {}  # plan index -> G2 block read, copied with G2's sources
        try:
            while done < len(g3_at):
                with self._tiers.lock:
                    room = min(g2.num_available, len(g3_at) - done)
                    staging = g2.allocate(room)
                if room == 0:  # G2 is all held: serve the prefix up to here
                    keep = g3_at[done]
                    break
                at = g3_at[done : done + room]
                done += room
                read = self.stage_from_disk(
                    [sources[i][1] for i in at], staging, [hashes[i] for i in at]
                )
                good = len(read)
                if good == room and done < len(g3_at):  # the next round needs G2's room
                    try:
                        targets = [dst[i] for i in at]
                        self._tiers.copy(Tier.G2, read, Tier.G1, targets, onboard=True)
                    finally:
                        with self._tiers.lock:
                            g2.free(read)
                else:
                    staged.update(zip(at[:good], read, strict=True))
                if good < room:
                    keep = at[good]
                    break
            copying = sorted([i for i in g2_at if i < keep] + list(staged))
            flight = self._copy_to_g1(
                [staged[i] if i in staged else sources[i][1] for i in copying],
                [dst[i] for i in copying],
                groups,
            )
        except BaseException:
            with self._tiers.lock:
                g1.free(dst)
                g2.free([sources[i][1] for i in g2_at] + list(staged.values()))
                self._release_g3([sources[i][1] for i in g3_at[done:]])
            raise
        with self._tiers.lock:
            g2.free([sources[i][1] for i in g2_at if i >= keep])  # the rest: when copied
            self._release_g3([sources[i][1] for i in g3_at[done:]])
            g1.free(dst[keep:])
            result, new = self._tiers.cache(g1, dst[:keep], hashes[:keep])
            if flight is not None:
                self._inflight.hold(flight)
            for b, c in zip(dst[:keep], result, strict=True):
                if c != b:  # another lookup onboarded it meanwhile: share that one
                    g1.acquire([c])
                    g1.free([b])
            self._tiers.emit_stored(Tier.G1, [h for _, h in new])
        return result

    def _copy_to_g1(
        self, src_ids: list[int], dst_ids: list[int], groups: tuple[range, ...]
    ) -> InFlight | None:
        """Issue the copy of G2 blocks ``src_ids`` into G1 blocks ``dst_ids``, layer group
        after layer group, on the onboard stream after the work queued so far on the
        current stream (which may still read what the G1 blocks held before). None if there
        is nothing to copy. On a machine without a GPU the transfers run on worker threads."""
        if not src_ids:
            return None
        source, destination = self._tiers[Tier.G2].handle, self._tiers[Tier.G1].handle
        stream = self._stream
        started, timing = time.perf_counter(), None
        try:
            if stream is not None:
                wait_for(stream, torch.cuda.current_stream(stream.device))
                start = StreamEvent.recorded(stream, timing=True)
                timing = (start, StreamEvent(stream.device, timing=True))
            options = TransferOptions(cuda_stream=stream)
            done = self._transfer.execute_layer_groups(
                source, src_ids, destination, dst_ids, groups, options
            )
            if stream is not None:
                timing[1].record(stream)
        except BaseException:
            if stream is not None:  # the caller lets the blocks go: the copies must end first
                stream.synchronize()
            raise
        copies = LayerCopies(groups, tuple(done))
        return InFlight(copies, dst_ids, src_ids, started, timing)

    def _release_g3(self, slots: list[int]) -> None:
        if slots:
            self._tiers[Tier.G3].pool.free(slots)

    def stage_from_disk(self, slots: list[int], staging: list[int], hashes: list[int]) -> list[int]:
        """Read held G3 ``slots`` into held G2 ``staging`` blocks and check them against the
        journal (:meth:`_read_and_check`); registers the good prefix in G2 and returns the G2
        blocks that cache it, held (a staging block whose hash another transfer cached
        meanwhile gives way to that block). The G3 holds and the staging blocks after the good
        prefix are let go; bad blocks leave G3."""
        g2, g3 = self._tiers[Tier.G2].pool, self._tiers[Tier.G3].pool
        try:
            matches = self._read_and_check(slots, staging, hashes)
        except BaseException:
            with self._tiers.lock:
                g3.free(slots)
                g2.free(staging)
            raise
        good = matches.index(False) if False in matches else len(matches)
        with self._tiers.lock:
            bad = [s for s, ok in zip(slots, matches, strict=False) if not ok]
            g3.free(slots)
            if bad:
                log.warning("%d G3 block(s) failed their checksum; dropped", len(bad))
                self._tiers.metrics.record_corrupt(len(bad))
                g3.discard(bad)
            held, new = self._tiers.cache_holding(g2, staging[:good], hashes[:good])
            g2.free(staging[good:])
            self._tiers.emit_stored(Tier.G2, [h for _, h in new])
        return held

    def _read_and_check(
        self, slots: list[int], staging: list[int], hashes: list[int]
    ) -> list[bool]:
        """Read G3 ``slots`` into G2 ``staging`` blocks in chunks of about
        :data:`READ_CHUNK_BYTES`, up to :data:`READ_AHEAD` chunks ahead of the one whose
        checksums are being worked out, so the disk reads on meanwhile. Returns, per block
        checked, whether its checksum is the journal's for its hash in ``hashes``; the chunk
        of the first bad block is the last checked. Every read has ended when this returns or
        raises; the reads are counted in the metrics, timed from the first one's start to the
        last one's end."""
        g2, g3 = self._tiers[Tier.G2], self._tiers[Tier.G3]
        per_chunk = max(1, READ_CHUNK_BYTES // self._tiers.block_bytes)
        chunks = [slice(i, i + per_chunk) for i in range(0, len(slots), per_chunk)]
        reads: list[TransferCompleteNotification] = []
        matches: list[bool] = []
        started = read_end = time.perf_counter()
        waited = 0
        try:
            for k, chunk in enumerate(chunks):
                for c in chunks[len(reads) : k + 1 + READ_AHEAD]:
                    reads.append(
                        self._transfer.execute_transfer(g3.handle, slots[c], g2.handle, staging[c])
                    )
                reads[k].wait()
                read_end, waited = time.perf_counter(), k + 1
                sums = block_checksums(g2.physical, staging[chunk])
                with self._tiers.lock:
                    journal = self._tiers.journal.blocks
                    pairs = zip(sums, hashes[chunk], strict=True)
                    matches += [s == journal[h].checksum for s, h in pairs]
                if not all(matches):
                    break
        finally:
            if waited < len(reads):  # nothing may write the staging blocks once they are let go
                wait_quietly(reads)
                read_end = time.perf_counter()
        read = min(len(staging), len(reads) * per_chunk)  # blocks whose read was issued
        self._tiers.record_copy(Tier.G3, Tier.G2, read, read_end - started, True)
        return matches
