"""The background offload of a ``BlockManager``: every block registered in G1 is copied to G2,
and every block stored in G2 on to G3 (if the disk filter lets it) and to the peers that take
offloads (G4), by one worker thread, so that a tier that evicts loses nothing a lower tier
holds.

Jobs hold their source blocks from the moment they are queued until they are copied; the
thread merges queued jobs into batches of up to :data:`OFFLOAD_BATCH` blocks. A failed batch
is logged and kept for :meth:`Offloader.take_failures` (``BlockManager.flush`` raises it).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from kvblocks.pool.inflight import InFlightCopies
from kvblocks.pool.journal import StoredBlock
from kvblocks.pool.offload_filter import OffloadFilter
from kvblocks.pool.peer_set import Peer, PeerSet
from kvblocks.pool.sharing import BlockChain
from kvblocks.pool.tier import Tier
from kvblocks.pool.tier_set import TierSet
from kvblocks.transfer import block_checksums

log = logging.getLogger("kvblocks.pool")

#: Most blocks one background offload moves at once.
OFFLOAD_BATCH = 256


@dataclass
class OffloadJob:
    """Blocks of ``src`` (held for this job) to copy one tier down.

    Attributes:
        ready: recorded on the engine's stream after it wrote the blocks' KV (G1 jobs on a
            GPU); the copy waits for it.
    """

    src: Tier
    block_ids: list[int]
    hashes: list[int]
    ready: torch.cuda.Event | None = None


class Offloader:
    """The offload thread of one manager's tiers (started here, stopped by :meth:`close`).

    Args:
        tiers: the manager's tiers; G2 must be one of them.
        inflight: copies into G1 still running (their G2 sources are let go before an offload
            looks for room in G2).
        peers: the peers; those added with ``offload=True`` get every block stored in G2.
        disk_filter: which blocks stored in G2 go on to G3 (None: every one).
        publish: publishes the events queued in ``tiers`` (called after each batch).
        device: where G1 lives; on a GPU the copies run on a stream of the thread's own.
    """

    def __init__(
        self,
        tiers: TierSet,
        inflight: InFlightCopies,
        peers: PeerSet,
        disk_filter: OffloadFilter | None,
        publish: Callable[[], None],
        device: torch.device,
    ) -> None:
        self._tiers = tiers
        self._inflight = inflight
        self._peers = peers
        self._disk_filter = disk_filter
        self._publish = publish
        self._device = device
        self._failures: list[BaseException] = []
        self._queue: queue.Queue[OffloadJob | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="kvblocks-offload", daemon=True)
        self._thread.start()

    def offload_g1(self, block_ids: list[int], hashes: list[int]) -> None:
        """Queue held G1 blocks for G2, after the work queued so far on the current CUDA
        stream (the engine's writes of their KV)."""
        ready = None
        if self._device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self._device))
        self._queue.put(OffloadJob(Tier.G1, block_ids, hashes, ready))

    def offload_late(self, hashes: list[int]) -> None:
        """Queue for G3 the blocks of ``hashes`` that G2 holds and G3 does not: the disk
        filter let them pass only now. Under the lock."""
        if Tier.G3 not in self._tiers:
            return
        g2, g3 = self._tiers[Tier.G2].pool, self._tiers[Tier.G3].pool
        late = [(b, h) for h in hashes if (b := g2.lookup(h)) is not None and g3.lookup(h) is None]
        if late:
            blocks = [b for b, _ in late]
            g2.acquire(blocks)
            self._queue.put(OffloadJob(Tier.G2, blocks, [h for _, h in late]))

    def drain(self, timeout: float | None = None) -> None:
        """Wait until every job queued so far has been carried out.

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"offloads still running after {timeout} s")
                self._queue.all_tasks_done.wait(left)

    def take_failures(self) -> list[BaseException]:
        """The failures of batches since the last call."""
        with self._tiers.lock:
            failures, self._failures = self._failures, []
        return failures

    def close(self) -> None:
        """Carry out the jobs queued so far, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        while True:
            job = self._queue.get()
            if job is None:
                self._queue.task_done()
                return
            jobs = [job]
            while sum(len(j.block_ids) for j in jobs) < OFFLOAD_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    self._queue.task_done()
                    break
                jobs.append(more)
            try:
                for src in (Tier.G1, Tier.G2):  # G2 jobs: blocks the disk filter let pass late
                    same = [j for j in jobs if j.src is src]
                    if same:
                        self._run_merged(src, same, stream)
            finally:
                for _ in jobs:
                    self._queue.task_done()
            self._publish()

    def _run_merged(
        self, src: Tier, jobs: list[OffloadJob], stream: torch.cuda.Stream | None
    ) -> None:
        """Run ``jobs`` (all from ``src``) as one; a failure is logged and kept."""
        merged = OffloadJob(
            src, [b for j in jobs for b in j.block_ids], [h for j in jobs for h in j.hashes]
        )
        try:
            for event in [j.ready for j in jobs if j.ready is not None]:
                event.synchronize()  # the engine has written the blocks' KV
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                self._run(merged)
        except BaseException as exc:
            log.exception("offload failed")
            with self._tiers.lock:
                self._failures.append(exc)

    def _run(self, job: OffloadJob) -> None:
        """Copy ``job``'s held blocks one tier down (and on to G3 from G2), in rounds as large
        as the lower tier has room for; frees the holds."""
        tiers = self._tiers
        dst_tier = Tier.G2 if job.src is Tier.G1 else Tier.G3
        src = tiers[job.src].pool
        dst_state = tiers.get(dst_tier)
        if dst_state is None:
            with tiers.lock:
                src.free(job.block_ids)
            return
        dst = dst_state.pool
        pending = list(zip(job.block_ids, job.hashes, strict=True))
        self._inflight.reap()  # sources of ended onboards leave G2's held blocks
        while pending:
            with tiers.lock:
                todo, present = [], []
                for b, h in pending:
                    (todo if dst.lookup(h) is None else present).append((b, h))
                src.free([b for b, _ in present])
                room = min(len(todo), dst.num_available)
                if room == 0:  # every lower-tier block is held: these stay in the upper tier
                    src.free([b for b, _ in todo])
                    if todo:
                        log.warning("%s full: %d block(s) not offloaded", dst_tier, len(todo))
                    return
                batch, pending = todo[:room], todo[room:]
                dst_ids = dst.allocate(room)
            self._run_batch(job.src, batch, dst_tier, dst_ids)

    def _run_batch(
        self, src_tier: Tier, blocks: list[tuple[int, int]], dst_tier: Tier, dst_ids: list[int]
    ) -> None:
        """Copy held ``blocks`` (``(block, hash)``) into the allocated ``dst_ids``, cache them
        there, and pass the new ones on: to G3 and to offload peers from G2."""
        tiers = self._tiers
        src, dst_state = tiers[src_tier].pool, tiers[dst_tier]
        dst = dst_state.pool
        src_ids = [b for b, _ in blocks]
        hashes = [h for _, h in blocks]
        try:
            self._copy_down(src_tier, src_ids, dst_tier, dst_ids, hashes)
        except BaseException:
            with tiers.lock:
                src.free(src_ids)
                dst.free(dst_ids)
            raise
        with tiers.lock:
            _, new = tiers.cache(dst, dst_ids, hashes)
            stored_blocks = [b for b, _ in new]
            stored = [h for _, h in new]
            tiers.emit_stored(dst_tier, stored)
            src.free(src_ids)
            to_disk = []
            if dst_tier is Tier.G2 and Tier.G3 in tiers:
                to_disk = [(b, h) for b, h in new if self._to_disk(h)]
                tiers.metrics.record_disk_filtered(len(new) - len(to_disk))
                dst.acquire([b for b, _ in to_disk])
            chains = []  # the stored blocks to offer to offload peers, held meanwhile
            if dst_tier is Tier.G2 and stored_blocks and self._peers.offload_targets():
                dst.acquire(stored_blocks)
                chains = [
                    BlockChain(h, tiers.chains[h].parent, tiers.chains[h].token_ids) for h in stored
                ]
            dst.free(dst_ids)
        if chains:
            try:
                self._peers.push(stored_blocks, chains, self._write_to_peer)
            finally:
                with tiers.lock:
                    dst.free(stored_blocks)
        if to_disk:
            self._run(OffloadJob(Tier.G2, [b for b, _ in to_disk], [h for _, h in to_disk]))

    def _copy_down(
        self,
        src_tier: Tier,
        src_ids: list[int],
        dst_tier: Tier,
        dst_ids: list[int],
        hashes: list[int],
    ) -> None:
        """The copy of one batch; into G3 with the blocks' checksums, synced and journaled."""
        tiers = self._tiers
        if dst_tier is not Tier.G3:
            tiers.copy(src_tier, src_ids, dst_tier, dst_ids, onboard=False)
            return
        sums = block_checksums(tiers[Tier.G2].physical, src_ids)
        tiers.copy(src_tier, src_ids, dst_tier, dst_ids, onboard=False)
        tiers[Tier.G3].physical.file.sync()
        tiers.journal.record_stored(
            [
                StoredBlock(h, slot, s, tiers.chains[h].parent, tiers.chains[h].token_ids)
                for h, slot, s in zip(hashes, dst_ids, sums, strict=True)
            ]
        )

    def _to_disk(self, sequence_hash: int) -> bool:
        """Whether a block stored in G2 goes on to G3 now (the disk filter's say)."""
        return self._disk_filter is None or self._disk_filter.passes(sequence_hash)

    def _write_to_peer(self, peer: Peer, src_ids: list[int], dst_ids: list[int]) -> None:
        self._tiers.copy(Tier.G2, src_ids, Tier.G4, dst_ids, onboard=False, peer=peer)
