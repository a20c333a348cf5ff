"""Copies from G2 into G1 that may still run (``BlockManager.lookup(..., wait=False)``), and
the blocks they hold until they end.

A lookup that returns before its copies end leaves their G1 blocks and G2 sources held here,
so that a hit freed early is never reused while it is being filled; a later lookup that shares
those G1 blocks gets the copies' events in its own ``ReadyLayers``. :meth:`InFlightCopies.reap`
lets go of the blocks of copies that have ended, dropping from the cache the G1 blocks of a
failed one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvblocks.errors import TransferError
from kvblocks.pool.ready import LayerCopies, ReadyLayers
from kvblocks.pool.tier import Tier
from kvblocks.pool.tier_set import TierSet
from kvblocks.transfer import StreamEvent, TransferCompleteNotification

log = logging.getLogger("kvblocks.pool")


@dataclass(eq=False)
class InFlight:
    """A copy from G2 into G1 that may still run, and the blocks held until it ends.

    Attributes:
        copies: its layer groups and their notifications.
        g1, g2: the destination and source block ids.
        started: ``time.perf_counter()`` when it was issued.
        timing: CUDA events recorded before and after it on its stream (None without a GPU).
    """

    copies: LayerCopies
    g1: list[int]
    g2: list[int]
    started: float
    timing: tuple[StreamEvent, StreamEvent] | None


class InFlightCopies:
    """The copies from G2 into G1 that may still run, under the tiers' lock.

    Args:
        tiers: the manager's tiers: the copies' destinations in G1, their sources in G2 (where
            the manager has no G2, no copy is ever held here), the lock over both and the
            metrics where an ended copy is recorded.
        num_layers: layers of a block (for :class:`ReadyLayers`).
        device: the device G1 lives on.
    """

    def __init__(self, tiers: TierSet, num_layers: int, device: torch.device) -> None:
        self._tiers = tiers
        self._num_layers = num_layers
        self._device = device
        self._flights: list[InFlight] = []
        self._at: dict[int, InFlight] = {}

    def hold(self, flight: InFlight) -> None:
        """Hold ``flight``'s G1 blocks once more (its G2 sources are held already) until
        :meth:`reap` sees its copies end, and let lookups that share its G1 blocks wait for
        them. Under the lock, after the blocks were cached."""
        self._tiers[Tier.G1].pool.hold(flight.g1)
        self._flights.append(flight)
        for b in flight.g1:
            self._at[b] = flight

    def ready(self, blocks: list[int], wait: bool) -> ReadyLayers:
        """What held G1 ``blocks`` wait for: the copies into them that may still run. With
        ``wait``, they are waited for here and nothing is left to wait for."""
        with self._tiers.lock:
            flights = {id(f): f for b in blocks if (f := self._at.get(b)) is not None}
        copies = [f.copies for f in flights.values()]
        ready = ReadyLayers(self._num_layers, copies, self._device)
        if not wait:
            return ready
        try:
            ready.synchronize()
        finally:
            self.reap()
        return ReadyLayers(self._num_layers, device=self._device)

    def reap(self) -> None:
        """Let go of the blocks of copies into G1 that have ended (successfully or not: the G1
        blocks of a failed copy are dropped from the cache)."""
        with self._tiers.lock:
            running, ended = [], []
            for flight in self._flights:
                (ended if flight.copies.poll() else running).append(flight)
            if not ended:
                return
            self._flights = running
            for flight in ended:
                self._let_go(flight)

    def settle(self) -> None:
        """Wait for every copy into G1 that may still run, and let go of its blocks."""
        with self._tiers.lock:
            flights = list(self._flights)
        for flight in flights:
            wait_quietly(flight.copies.done)  # reap drops the blocks of a failed one
        self.reap()

    def _let_go(self, flight: InFlight) -> None:
        """Release the blocks of ``flight``, which has ended, and record it. Under the lock."""
        g1 = self._tiers[Tier.G1].pool
        for b in flight.g1:
            del self._at[b]
        failed = next((e for d in flight.copies.done if (e := d.exception())), None)
        if failed is not None:
            log.error("a copy into G1 failed; its blocks leave the cache: %s", failed)
            g1.discard([b for b in flight.g1 if g1.hash_of(b) is not None])
        g1.free(flight.g1)
        self._tiers[Tier.G2].pool.free(flight.g2)
        if flight.timing is not None:
            seconds = flight.timing[0].seconds_until(flight.timing[1])
        else:
            seconds = time.perf_counter() - flight.started
        self._tiers.record_copy(Tier.G2, Tier.G1, len(flight.g1), seconds, True)


def wait_quietly(notifications: Sequence[TransferCompleteNotification]) -> None:
    """Wait until each of ``notifications`` completes, failed or not."""
    for notification in notifications:
        try:
            notification.wait()
        except TransferError:
            pass
