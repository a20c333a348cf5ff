"""When the KV of a prefix hit is in G1, layer by layer.

A lookup that copies blocks into G1 (from G2, G3 or a peer) can return before the copies end
(``BlockManager.lookup(..., wait=False)``). The copies run on a stream of their own, one layer
group after another, so an engine's forward pass can start on layer 0 while the later layers
are still on the way: before the attention of layer ``l`` it makes its stream wait for that
layer (:meth:`ReadyLayers.wait_layer`), which costs the host nothing on a GPU.

A hit can depend on several copies: its own, and those of another lookup that brought some of
the same blocks in a moment earlier and whose copies still run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvblocks.errors import InvalidArgumentError
from kvblocks.transfer import TransferCompleteNotification


def layer_groups(num_layers: int, count: int) -> tuple[range, ...]:
    """``range(num_layers)`` cut into ``min(count, num_layers)`` contiguous groups whose sizes
    differ by at most one, the larger ones first."""
    count = min(count, num_layers)
    size, extra = divmod(num_layers, count)
    groups, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        groups.append(range(start, end))
        start = end
    return tuple(groups)


@dataclass(frozen=True)
class LayerCopies:
    """One copy into G1, issued as one transfer per layer group.

    Attributes:
        groups: the layer groups in the order they were issued, covering every layer.
        done: ``done[i]`` completes when the layers of ``groups[i]`` are in place.
    """

    groups: tuple[range, ...]
    done: tuple[TransferCompleteNotification, ...]

    def group_of(self, layer: int) -> int:
        """The index of the group that holds ``layer`` (one of the layers the groups cover)."""
        return next(i for i, group in enumerate(self.groups) if layer in group)

    def poll(self) -> bool:
        """Whether every group is in place, without blocking."""
        return all(d.poll() for d in self.done)


class ReadyLayers:
    """When each layer of a :class:`~kvblocks.pool.manager.PrefixHit`'s blocks holds its KV.

    Args:
        num_layers: the manager's layers (``nl``); None where nothing is waited for.
        copies: the copies into G1 the hit's blocks wait for (none: all in place already).
        device: the GPU of G1, whose current stream the waits apply to by default; None or a
            CPU device: waits block the host.
    """

    def __init__(
        self,
        num_layers: int | None = None,
        copies: Sequence[LayerCopies] = (),
        device: torch.device | None = None,
    ) -> None:
        self.num_layers = num_layers
        self._copies = tuple(copies)
        self._device = device if device is not None and device.type == "cuda" else None

    def wait_layer(self, layer: int, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (the current CUDA stream by default) wait until layer ``layer`` of
        every held block is in place; on a GPU the host does not wait. Where there is no GPU
        the host waits instead.

        Raises:
            InvalidArgumentError: ``layer`` is not in ``[0, num_layers)``.
            TransferError: a copy failed.
        """
        top = self.num_layers
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int)
            or layer < 0
            or (top is not None and layer >= top)
        ):
            raise InvalidArgumentError("layer", f"must be in [0, {top}), got {layer!r}")
        stream = self._stream(stream)
        for copy in self._copies:
            copy.done[copy.group_of(layer)].wait_on_stream(stream)

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """:meth:`wait_layer` for every layer."""
        stream = self._stream(stream)
        for copy in self._copies:
            for done in copy.done:
                done.wait_on_stream(stream)

    def synchronize(self) -> None:
        """Block the host until every layer is in place.

        Raises:
            TransferError: a copy failed.
        """
        for copy in self._copies:
            for done in copy.done:
                done.wait()

    def done(self) -> bool:
        """Whether every layer is in place, without blocking."""
        return all(copy.poll() for copy in self._copies)

    def _stream(self, stream: torch.cuda.Stream | None) -> torch.cuda.Stream | None:
        if stream is None and self._device is not None:
            return torch.cuda.current_stream(self._device)
        return stream
