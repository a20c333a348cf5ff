"""How a transfer between two kinds of storage is carried out (docs/transfers.md has the table).

Storage falls in four classes: GPU memory, host memory (pinned or system; on a machine without
a GPU, device and pinned layouts are host memory too), files, and remote memory. Pinned memory
on a machine with a GPU is also reachable by GPU kernels and copy engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from kvblocks.errors import BackendUnavailableError
from kvblocks.layout import KvBlockLayout
from kvblocks.storage import StorageKind
from kvblocks.transfer.executor import Hop, HopKind, Side


class Strategy(Enum):
    KERNEL = "kernel"
    """One copy or permute kernel: device<->device, device<->pinned (zero copy)."""
    COPY_ENGINE = "copy_engine"
    """cudaMemcpyBatchAsync: device<->pinned when preferred, same format."""
    COPY_ENGINE_PERMUTE = "copy_engine_permute"
    """Copy engine into (or out of) a device temporary, permute kernel on the device."""
    HOST_COPY = "host_copy"
    """CPU threads: between host memories (a permute on the CPU for a format change)."""
    PINNED_BOUNCE = "pinned_bounce"
    """Device<->system memory: a kernel to or from a pinned bounce buffer, then a CPU copy."""
    DISK_IO = "disk_io"
    """A file to or from host memory, direct; same format."""
    DISK_BOUNCE = "disk_bounce"
    """A file to or from device memory (or with a format change) through a pinned bounce."""

    @property
    def stays_on_gpu(self) -> bool:
        """Whether the transfer is only GPU work on a stream (no CPU or disk steps)."""
        return self in (Strategy.KERNEL, Strategy.COPY_ENGINE)


@dataclass(frozen=True)
class Bounce:
    """A staging buffer the manager provides for one route: ``pinned`` host memory or a
    ``device`` temporary, holding the transferred blocks in ``fmt``."""

    where: str
    fmt: KvBlockLayout


End = Side | Bounce


@dataclass(frozen=True)
class Route:
    strategy: Strategy
    hops: tuple[tuple[HopKind, End, End], ...]

    def bounces(self) -> list[Bounce]:
        """The staging buffers the hops need, in order of first use."""
        seen: list[Bounce] = []
        for _, a, b in self.hops:
            for end in (a, b):
                if isinstance(end, Bounce) and end not in seen:
                    seen.append(end)
        return seen

    def with_buffers(self, buffers: dict[Bounce, Side]) -> list[Hop]:
        """The hops with each bounce replaced by the side holding it."""
        return [Hop(kind, buffers.get(a, a), buffers.get(b, b)) for kind, a, b in self.hops]


def route(src: Side, dst: Side, copy_engine: bool) -> Route:
    """The strategy and hops that move ``src`` into ``dst``.

    Args:
        copy_engine: prefer ``cudaMemcpyBatchAsync`` to kernels between device and pinned.

    Raises:
        BackendUnavailableError: remote storage (it moves through NIXL, not offered here yet).
    """
    for side in (src, dst):
        if side.physical.storage is StorageKind.REMOTE:
            raise BackendUnavailableError(
                "remote layouts move through NIXL, which this installation does not offer"
            )
    change = src.fmt.requires_transform(dst.fmt)
    src_file = src.physical.storage is StorageKind.DISK
    dst_file = dst.physical.storage is StorageKind.DISK
    read_as, written_as = Bounce("pinned", src.fmt), Bounce("pinned", dst.fmt)
    H = HopKind

    if src_file and dst_file:
        if change:
            hops = (
                (H.DISK_READ, src, read_as),
                (H.HOST, read_as, written_as),
                (H.DISK_WRITE, written_as, dst),
            )
        else:
            hops = ((H.DISK_READ, src, read_as), (H.DISK_WRITE, read_as, dst))
        return Route(Strategy.DISK_BOUNCE, hops)
    if src_file:
        if dst.on_gpu or change:
            last = H.GPU if dst.on_gpu else H.HOST
            return Route(Strategy.DISK_BOUNCE, ((H.DISK_READ, src, read_as), (last, read_as, dst)))
        return Route(Strategy.DISK_IO, ((H.DISK_READ, src, dst),))
    if dst_file:
        if src.on_gpu or change:
            first = H.GPU if src.on_gpu else H.HOST
            return Route(
                Strategy.DISK_BOUNCE, ((first, src, written_as), (H.DISK_WRITE, written_as, dst))
            )
        return Route(Strategy.DISK_IO, ((H.DISK_WRITE, src, dst),))

    if not (src.on_gpu or dst.on_gpu):
        return Route(Strategy.HOST_COPY, ((H.HOST, src, dst),))
    if src.gpu_reachable and dst.gpu_reachable:
        if not copy_engine or (src.on_gpu and dst.on_gpu):
            return Route(Strategy.KERNEL, ((H.GPU, src, dst),))
        if not change:
            return Route(Strategy.COPY_ENGINE, ((H.COPY_ENGINE, src, dst),))
        if src.on_gpu:  # permute on the device, then the copy engine out
            temp = Bounce("device", dst.fmt)
            hops = ((H.GPU, src, temp), (H.COPY_ENGINE, temp, dst))
        else:  # the copy engine in, then permute on the device
            temp = Bounce("device", src.fmt)
            hops = ((H.COPY_ENGINE, src, temp), (H.GPU, temp, dst))
        return Route(Strategy.COPY_ENGINE_PERMUTE, hops)
    if src.on_gpu:  # into pageable system memory
        return Route(Strategy.PINNED_BOUNCE, ((H.GPU, src, written_as), (H.HOST, written_as, dst)))
    return Route(Strategy.PINNED_BOUNCE, ((H.HOST, src, read_as), (H.GPU, read_as, dst)))
