"""How one transfer, and a TransferManager, should move blocks."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

import torch

from kvblocks.errors import InvalidArgumentError
from kvblocks.layout import KvBlockLayout
from kvblocks.transfer.handles import LayoutHandle

#: Default of ``TransferPreferences.copy_engine_min_bytes``: where the copy engine overtook the
#: kernels on an H100 (docs/performance.md).
COPY_ENGINE_MIN_BYTES = 16 << 20

#: Default of ``TransferPreferences.staged_min_bytes``: where a staged transfer costs the host
#: less time than the GPU spends on it (docs/performance.md).
STAGED_MIN_BYTES = 32 << 20


class NativeVsNixlPolicy(Enum):
    """Whether transfers between this worker's memories go through kvblocks' own paths
    (kernels, copy engines, host copies) or NIXL. Transfers with a remote layout always go
    through NIXL."""

    PREFER_NATIVE = "prefer_native"
    PREFER_NIXL = "prefer_nixl"
    """Not offered: a TransferManager refuses it (NIXL loopback between local memories is
    slower than the native paths on every machine measured)."""
    AUTOMATIC = "automatic"
    """The native paths (what ``PREFER_NATIVE`` does)."""


@dataclass(frozen=True)
class TransferCapabilities:
    """What the hardware may be asked to do.

    Attributes:
        allow_gds: GPU Direct Storage between GPU and disk (not used yet: disk traffic always
            goes through a pinned bounce buffer).
        allow_gpu_rdma: NIXL reads and writes GPU memory itself in transfers with other
            workers (worth it with RDMA or NVLink between them); otherwise GPU memory is staged
            through pinned memory by the copy kernel.
    """

    allow_gds: bool = False
    allow_gpu_rdma: bool = False


@dataclass(frozen=True)
class TransferPreferences:
    """Hints for choosing among paths that all work.

    Attributes:
        native_vs_nixl: see :class:`NativeVsNixlPolicy`.
        copy_engine: move device<->pinned blocks with ``cudaMemcpyBatchAsync`` instead of
            kernels reading or writing pinned memory. Where both sides have the same spans
            (whole blocks on both, or regions on both) the copy engine moves them directly
            (55 against 51 GB/s h2d on an H100 for whole blocks, much slower for many small
            regions); whole pinned blocks and a layer-separate device layout, or a format
            change, are staged through slots from the device memory pool (``STAGED``: the
            copy engine and a kernel overlapped, up to 7% faster than the kernel alone into
            the GPU for 128 blocks, docs/performance.md).
        copy_engine_min_bytes: same-format transfers of whole blocks (both layouts fully
            contiguous, every layer) between device and pinned memory of at least this many
            bytes use the copy engine, as ``copy_engine`` does (55 against 51 GB/s h2d on an
            H100 from 16 MiB up). ``None`` leaves them to the kernels. Needs cuda-bindings
            (extra ``gpu``); without it the kernels move them.
        staged_min_bytes: transfers of at least this many bytes between whole blocks in
            pinned memory (a fully contiguous layout; every layer, or some layers whose format
            changes) and a device layout without the same spans (an engine's layer-separate
            cache, or another format) are staged (``STAGED``), as ``copy_engine`` does,
            through two slots of up to 64 MiB from the device memory pool. Staged, a transfer
            holds SMs only to place or gather the slots' blocks: work the engine runs
            meanwhile is slowed by 1% to 6%, and the transfer is faster than the kernel's,
            alone and beside that work (docs/performance.md, "Transfers while the engine
            computes"). Below it the host's cost per call would exceed the GPU's, and the
            kernels (on a few programs, slowing the engine's work by up to 19%) move them.
            ``None`` leaves them all to the kernels. Needs cuda-bindings.
    """

    native_vs_nixl: NativeVsNixlPolicy = NativeVsNixlPolicy.AUTOMATIC
    copy_engine: bool = False
    copy_engine_min_bytes: int | None = COPY_ENGINE_MIN_BYTES
    staged_min_bytes: int | None = STAGED_MIN_BYTES


@dataclass(frozen=True)
class BounceBuffer:
    """Blocks of a registered pinned layout to stage a transfer through (instead of a temporary
    the manager allocates). One bounce block per transferred block."""

    handle: LayoutHandle
    block_ids: tuple[int, ...]

    @classmethod
    def from_handle(cls, handle: LayoutHandle, block_ids: Iterable[int]) -> BounceBuffer:
        if not isinstance(handle, LayoutHandle):
            raise InvalidArgumentError("handle", f"must be a LayoutHandle, got {handle!r}")
        try:
            ids = tuple(operator.index(b) for b in block_ids)
        except TypeError as exc:
            raise InvalidArgumentError("block_ids", f"must hold ints: {exc}") from None
        return cls(handle, ids)


@dataclass(frozen=True)
class TransferOptions:
    """Options of one transfer; every field is optional.

    Attributes:
        layer_range: only these layers (a ``range`` with step 1); all by default.
        src_kv_layout, dst_kv_layout: read the source / write the destination as this block
            format instead of its layout's own; formats that differ select the permute kernel.
        bounce_buffer: stage through these pinned blocks.
        cuda_stream: run on this stream (of the transfer's GPU) and record no event: the
            returned notification is complete at once and the caller synchronizes (only for
            transfers that stay on the GPU: device and pinned memory).
        nixl_write_notification: a message for the remote side of a NIXL write.
    """

    layer_range: range | None = None
    src_kv_layout: KvBlockLayout | None = None
    dst_kv_layout: KvBlockLayout | None = None
    bounce_buffer: BounceBuffer | None = None
    cuda_stream: torch.cuda.Stream | None = None
    nixl_write_notification: bytes | None = field(default=None, repr=False)
