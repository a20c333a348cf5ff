"""How a transfer between two kinds of storage is carried out (docs/transfers.md has the table).

Storage falls in four classes: GPU memory, host memory (pinned or system; on a machine without
a GPU, device and pinned layouts are host memory too), files, and remote memory. Pinned memory
on a machine with a GPU is also reachable by GPU kernels and copy engines. Remote memory is
another worker's, read or written by this worker's NIXL agent.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from kvblocks.errors import BackendUnavailableError, InvalidArgumentError
from kvblocks.layout import KvBlockLayout
from kvblocks.storage import StorageKind
from kvblocks.transfer.executor import Hop, HopKind, Side, whole_blocks


class Strategy(Enum):
    KERNEL = "kernel"
    """One copy or permute kernel: device<->device, device<->pinned (zero copy)."""
    COPY_ENGINE = "copy_engine"
    """cudaMemcpyBatchAsync: device<->pinned, same format and the same spans on both sides,
    when preferred or for whole blocks of at least ``copy_engine_min_bytes``."""
    STAGED = "staged"
    """Through slots of device memory, a few blocks at a time: the copy engine between pinned
    memory and a slot, a copy or permute kernel between the slot and the device layout, the
    two overlapped. Between whole pinned blocks and a device layout without the same spans (a
    layer-separate one, or another format): from ``staged_min_bytes`` up, or at any size when
    the copy engine is preferred. Some layers of each block (their format changing) only where
    the copies move ``STAGED_MIN_COPY_BYTES`` each on average, unless the copy engine is
    preferred."""
    HOST_COPY = "host_copy"
    """CPU threads: between host memories (a permute on the CPU for a format change)."""
    PINNED_BOUNCE = "pinned_bounce"
    """Device<->system memory: a kernel to or from a pinned bounce buffer, then a CPU copy."""
    DISK_IO = "disk_io"
    """A file to or from host memory, direct; same format."""
    DISK_BOUNCE = "disk_bounce"
    """A file to or from device memory (or with a format change) through a pinned bounce."""
    NIXL = "nixl"
    """One NIXL READ or WRITE between local memory and another worker's; same format."""
    NIXL_BOUNCE = "nixl_bounce"
    """NIXL to or from a pinned bounce, and a local step between the bounce and the layout
    (a format change, a file, or GPU memory without ``allow_gpu_rdma``)."""

    @property
    def stays_on_gpu(self) -> bool:
        """Whether the transfer is only GPU work on a stream (no CPU or disk steps)."""
        return self in (Strategy.KERNEL, Strategy.COPY_ENGINE, Strategy.STAGED)


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


@dataclass(frozen=True)
class RoutePolicy:
    """What the manager allows a route to use.

    Attributes:
        copy_engine: prefer ``cudaMemcpyBatchAsync`` to kernels between device and pinned.
        nixl: this worker has a NIXL agent (remote layouts can move).
        gpu_rdma: NIXL may read and write GPU memory directly (else through pinned memory).
        copy_engine_min_bytes: same-format transfers of whole blocks between device and
            pinned memory of at least this many bytes use the copy engine (``None``: only when
            ``copy_engine`` says so).
        staged_min_bytes: transfers of at least this many bytes between whole pinned blocks
            and a device layout without the same spans are staged (``None``: only when
            ``copy_engine`` says so).
    """

    copy_engine: bool = False
    nixl: bool = False
    gpu_rdma: bool = False
    copy_engine_min_bytes: int | None = None
    staged_min_bytes: int | None = None


def route(src: Side, dst: Side, policy: RoutePolicy, layers: range | None = None) -> Route:
    """The strategy and hops that move layers ``layers`` (default: all) of ``src`` into
    ``dst``.

    Raises:
        BackendUnavailableError: a remote layout, and this worker has no NIXL agent.
        InvalidArgumentError: both layouts are remote.
    """
    remote_src = src.physical.storage is StorageKind.REMOTE
    remote_dst = dst.physical.storage is StorageKind.REMOTE
    if remote_src or remote_dst:
        if remote_src and remote_dst:
            raise InvalidArgumentError(
                "dst", "is remote, like the source: one side of a transfer must be this worker's"
            )
        if not policy.nixl:
            raise BackendUnavailableError(
                "remote layouts move through NIXL: build the TransferManager with"
                " .nixl_backend('UCX') (extra: remote)"
            )
        return _remote_route(src, dst, remote_src, policy.gpu_rdma)
    copy_engine = policy.copy_engine
    layers = range(src.config.num_layers) if layers is None else layers
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
        if src.on_gpu and dst.on_gpu:
            return Route(Strategy.KERNEL, ((H.GPU, src, dst),))
        whole = not change and whole_blocks(src, dst, layers)
        pinned = dst if src.on_gpu else src
        # Slots take whole pinned blocks, or the moved layers of each where their format
        # changes on the way (a same-format part of a block moves region by region, directly).
        stageable = pinned.physical.layout.is_fully_contiguous and (
            change or len(layers) == src.config.num_layers
        )
        if not copy_engine:  # the kernel, but the copy engine for large whole pinned blocks
            if whole and _at_least(src, layers, policy.copy_engine_min_bytes):
                return Route(Strategy.COPY_ENGINE, ((H.COPY_ENGINE, src, dst),))
            staged = stageable and _at_least(src, layers, policy.staged_min_bytes)
            if whole or not (staged and _copies_keep_up(pinned, layers)):
                return Route(Strategy.KERNEL, ((H.GPU, src, dst),))
        elif whole or not (change or stageable):  # the same spans on both sides
            return Route(Strategy.COPY_ENGINE, ((H.COPY_ENGINE, src, dst),))
        elif not stageable:  # a format change of pinned regions: the kernel
            return Route(Strategy.KERNEL, ((H.GPU, src, dst),))
        slot = Bounce("device", pinned.fmt)  # slots hold blocks as the pinned side does
        if src.on_gpu:  # a kernel into a slot, then the copy engine out
            hops = ((H.GPU, src, slot), (H.COPY_ENGINE, slot, dst))
        else:  # the copy engine into a slot, then a kernel into place
            hops = ((H.COPY_ENGINE, src, slot), (H.GPU, slot, dst))
        return Route(Strategy.STAGED, hops)
    if src.on_gpu:  # into pageable system memory
        return Route(Strategy.PINNED_BOUNCE, ((H.GPU, src, written_as), (H.HOST, written_as, dst)))
    return Route(Strategy.PINNED_BOUNCE, ((H.HOST, src, read_as), (H.GPU, read_as, dst)))


def _at_least(src: Side, layers: range, least: int | None) -> bool:
    """Whether the transfer of layers ``layers`` of ``src``'s blocks moves at least ``least``
    bytes (never, for ``None``)."""
    config = src.config
    nbytes = src.ids.numel() * len(layers) * config.outer_dim * config.region_bytes
    return least is not None and nbytes >= least


#: Bytes per copy, at least, for some layers of each block to be staged rather than read by
#: the kernel: the copy engine moves those layers of each run of neighbouring pinned blocks
#: with one ``cudaMemcpy2DAsync``, which holds the host about 3 to 4 us (H100,
#: docs/performance.md); the copy engine moves some 200 KiB meanwhile. Below about twice that,
#: the host issues the copies hardly faster than they run (and an engine's forward pass waits
#: for the host), where the kernel reads pinned memory itself in one launch.
STAGED_MIN_COPY_BYTES = 384 << 10


def _copies_keep_up(pinned: Side, layers: range) -> bool:
    """Whether staging layers ``layers`` of ``pinned``'s blocks moves at least
    ``STAGED_MIN_COPY_BYTES`` per copy (always, when every layer moves: the copy engine then
    takes all of the blocks in one batch)."""
    config = pinned.config
    if len(layers) == config.num_layers:
        return True
    ids = sorted(pinned.ids.tolist())  # not torch ops, which let the GIL go
    runs = 1 + sum(b - a != 1 for a, b in zip(ids, ids[1:], strict=False))
    nbytes = len(ids) * len(layers) * config.outer_dim * config.region_bytes
    return nbytes >= runs * STAGED_MIN_COPY_BYTES


def _remote_route(src: Side, dst: Side, remote_src: bool, gpu_rdma: bool) -> Route:
    """NIXL straight between the local layout and the remote one where it can, else through a
    pinned bounce holding the blocks in the remote layout's format."""
    local, remote = (dst, src) if remote_src else (src, dst)
    nixl = HopKind.NIXL_READ if remote_src else HopKind.NIXL_WRITE
    storage = local.physical.storage
    direct = (
        not src.fmt.requires_transform(dst.fmt)
        and storage is not StorageKind.DISK
        and (gpu_rdma or not local.on_gpu)
    )
    if direct:
        return Route(Strategy.NIXL, ((nixl, src, dst),))
    staged = Bounce("pinned", remote.fmt)
    if remote_src:
        return Route(Strategy.NIXL_BOUNCE, ((nixl, src, staged), *_local_hops(staged, dst)))
    return Route(Strategy.NIXL_BOUNCE, (*_local_hops(src, staged), (nixl, staged, dst)))


def _local_hops(src: End, dst: End) -> tuple[tuple[HopKind, End, End], ...]:
    """Between a pinned bounce and a local layout (either way round)."""
    H = HopKind
    local = dst if isinstance(src, Bounce) else src
    if local.physical.storage is StorageKind.DISK:
        file_fmt = Bounce("pinned", local.fmt)
        if local is dst:
            if src.fmt.requires_transform(dst.fmt):
                return ((H.HOST, src, file_fmt), (H.DISK_WRITE, file_fmt, dst))
            return ((H.DISK_WRITE, src, dst),)
        if src.fmt.requires_transform(dst.fmt):
            return ((H.DISK_READ, src, file_fmt), (H.HOST, file_fmt, dst))
        return ((H.DISK_READ, src, dst),)
    return ((H.GPU if local.on_gpu else H.HOST, src, dst),)
