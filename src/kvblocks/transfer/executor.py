"""The steps a transfer is made of, and how each one runs.

A transfer is a short list of :class:`Hop` s, each moving the same blocks between two
:class:`Side` s (a layout, block ids in it, and the format its bytes are read or written as):

===============  ===============================================================================
``GPU``          a copy or permute kernel on a CUDA stream; device and pinned memory
``COPY_ENGINE``  ``cudaMemcpyBatchAsync`` on a CUDA stream; device and pinned, same format
``HOST``         the CPU: threaded ``memmove`` (or a permute on the CPU) between host memories
``DISK_READ``    a file into host memory
``DISK_WRITE``   host memory into a file
``NIXL_READ``    another worker's memory into local memory, through NIXL; same format
``NIXL_WRITE``   local memory into another worker's, through NIXL; same format
===============  ===============================================================================

Copies move whole blocks when both sides are fully contiguous and every layer moves, else one
``(block, layer, outer)`` region at a time. A format change goes through the permute kernel
(or its CPU path), of every layer or of a layer range.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from enum import Enum
from functools import cached_property

import torch

from kvblocks.errors import LayoutFormatError
from kvblocks.kernels import (
    CopyPlan,
    Operand,
    PermutePlan,
    available,
    pinned_programs,
    plan_copy,
    plan_memcpy,
    plan_permute,
)
from kvblocks.kernels.addresses import StridedTable, common_alignment
from kvblocks.kernels.copy import copy_step_bytes
from kvblocks.kernels.cuda_calls import StreamEvent
from kvblocks.kernels.permutes import permute_step_bytes
from kvblocks.layout import FullyContiguousLayout, KvBlockLayout, KvDims, LayoutConfig
from kvblocks.layout.dtypes import DTYPES
from kvblocks.remote import MemKind, NixlAgent, NixlOp, RemoteMemory, memory_of
from kvblocks.storage import MemoryAllocation, PhysicalLayout, StorageKind, allocate_pinned
from kvblocks.storage.disk import merge_spans

_CPU = torch.device("cpu")

#: A dtype of each width, to describe blocks whose element type does not matter (bytes move).
_DTYPE_OF_WIDTH = {1: DTYPES["u8"], 2: DTYPES["f16"], 4: DTYPES["f32"], 8: DTYPES["f64"]}


class HopKind(Enum):
    GPU = "gpu"
    COPY_ENGINE = "copy_engine"
    HOST = "host"
    DISK_READ = "disk_read"
    DISK_WRITE = "disk_write"
    NIXL_READ = "nixl_read"
    NIXL_WRITE = "nixl_write"


@dataclass(frozen=True)
class Side:
    """Blocks ``ids`` (an int64 CPU tensor) of ``physical``, read or written as ``fmt``.

    A side lives for one transfer: what it derives from its layout is worked out once.
    """

    physical: PhysicalLayout
    ids: torch.Tensor
    fmt: KvBlockLayout

    @property
    def config(self) -> LayoutConfig:
        return self.physical.config

    @cached_property
    def on_gpu(self) -> bool:
        """Its memory is GPU memory."""
        device = self.physical.device
        return device is not None and device.type == "cuda"

    @cached_property
    def gpu_reachable(self) -> bool:
        """GPU kernels and copy engines can read and write it (GPU memory, or pinned memory on
        a machine with a GPU)."""
        return self.on_gpu or (
            self.physical.storage is StorageKind.PINNED and not self.physical.emulated
        )

    def operand(self) -> Operand:
        return Operand(self.fmt, stack=not self.physical.layout.is_fully_contiguous)


@dataclass(frozen=True)
class Hop:
    kind: HopKind
    src: Side
    dst: Side


def dims_of(config: LayoutConfig) -> KvDims:
    """The block dims of a config whose ``num_heads`` is known (for permutes)."""
    return config.dims(_DTYPE_OF_WIDTH[config.dtype_width_bytes])


@dataclass
class _Addressing:
    """How one layout's blocks are addressed: chunk ``c`` of block ``b`` is at
    ``chunks[c] + b * stride``."""

    chunks: torch.Tensor  # int64, on the CPU
    stride: int
    align: int  # the largest power of two up to 16 dividing every chunk and the stride
    #: The copy of ``chunks`` on each GPU, and the event that marks it copied (``None`` once
    #: it has been seen complete).
    on_device: dict[torch.device, tuple[torch.Tensor, StreamEvent | None]]

    def chunks_on(self, device: torch.device) -> torch.Tensor:
        """``chunks`` on ``device``, for work on its current stream. Copied there once,
        without blocking the host; a stream that reads the copy before it has landed waits
        for it on the GPU."""
        if device.type == "cpu":
            return self.chunks
        if device not in self.on_device:
            copied = self.chunks.pin_memory().to(device, non_blocking=True)
            done = StreamEvent.recorded(torch.cuda.current_stream(device))
            self.on_device[device] = (copied, done)
        copied, done = self.on_device[device]
        if done is not None:
            if done.query():
                self.on_device[device] = (copied, None)
            else:
                done.wait(torch.cuda.current_stream(device))
        return copied


#: What ends a row of ``n`` block ids, by ``n % 2``: nothing, or one id, so that the next row
#: starts 16-byte aligned.
_PADS = (torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))

#: Per layout (dropped with it), per (first layer, end layer, whole blocks).
_ADDRESSING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _addressing(side: Side, layers: range, whole_blocks: bool) -> _Addressing:
    if not whole_blocks and side.fmt.dim_order is not None and not side.fmt.is_operational():
        raise LayoutFormatError(
            "layer_range",
            f"must cover every layer for blocks in {side.fmt.name}: their (layer, outer) slices"
            " are not contiguous",
        )
    per_layout = _ADDRESSING.setdefault(side.physical, {})
    key = (layers.start, layers.stop, whole_blocks)
    if key not in per_layout:
        layout = side.physical.layout
        offsets = [layout.memory[0].addr] if whole_blocks else layout.chunk_offsets(layers)
        chunks = torch.tensor(offsets, dtype=torch.int64)
        align = common_alignment(chunks, layout.block_stride)
        per_layout[key] = _Addressing(chunks, layout.block_stride, align, {})
    return per_layout[key]


def _tables(
    src: Side,
    dst: Side,
    layers: range,
    whole: tuple[bool, bool],
    device: torch.device,
) -> tuple[StridedTable, StridedTable, int]:
    """Both sides' address tables on ``device`` (whole blocks or ``(block, layer, outer)``
    regions, per side), and the largest power of two up to 16 dividing every address.

    Only the block ids travel to a GPU, both sides' in one copy from pinned memory that does
    not block the host; the kernel computes the addresses from them and the layouts' chunk
    offsets, which stay on the device.
    """
    if device.type == "cuda":
        n = src.ids.numel()
        odd = n % 2
        # An even row length starts both rows 16-byte aligned whatever the count, so the
        # kernels (which Triton compiles per pointer alignment) are compiled once. One torch
        # op per step (each costs the host several microseconds, and lets the GIL go).
        pad = _PADS[odd]
        staged = torch.empty(2 * (n + odd), dtype=torch.int64, pin_memory=True)
        torch.cat((src.ids, pad, dst.ids, pad), out=staged)
        both = staged.to(device, non_blocking=True)
        ids = both.split((n, odd, n, odd))[::2]
    else:
        ids = (src.ids, dst.ids)
    tables, align = [], 16
    for side, side_ids, side_whole in zip((src, dst), ids, whole, strict=True):
        a = _addressing(side, layers, side_whole)
        tables.append(StridedTable(side_ids, a.chunks_on(device), a.stride))
        align = min(align, a.align)
    return tables[0], tables[1], align


def whole_blocks(src: Side, dst: Side, layers: range) -> bool:
    """Whether a same-format copy moves each block as one span: both layouts fully contiguous,
    every layer."""
    every = len(layers) == src.config.num_layers
    return every and all(s.physical.layout.is_fully_contiguous for s in (src, dst))


def copy_pairs(
    src: Side, dst: Side, layers: range, device: torch.device = _CPU
) -> tuple[StridedTable, StridedTable, int, int]:
    """Source and destination address tables, the bytes of each pair and the pairs' common
    alignment, for a same-format copy: whole blocks when both layouts are fully contiguous
    and every layer moves, else ``(block, layer, outer)`` regions."""
    whole = whole_blocks(src, dst, layers)
    size = src.config.block_bytes if whole else src.config.region_bytes
    s, d, align = _tables(src, dst, layers, (whole, whole), device)
    return s, d, size, min(align, common_alignment(size))


def permute_tables(
    src: Side, dst: Side, layers: range, device: torch.device = _CPU
) -> tuple[StridedTable, StridedTable, bool]:
    """Tables for the permute kernel moving layers ``layers`` (a block stack's regions of those
    layers, else whole blocks' starts) and whether every address and row is 16-byte
    aligned."""
    whole = (src.physical.layout.is_fully_contiguous, dst.physical.layout.is_fully_contiguous)
    s, d, align = _tables(src, dst, layers, whole, device)
    row = dims_of(src.config).hd * src.config.dtype_width_bytes
    return s, d, min(align, common_alignment(row)) == 16


def run_gpu(hop: Hop, layers: range, device: torch.device, check_overlap: bool) -> None:
    """Launch the hop's kernel on the current stream of ``device``.

    The manager has checked the block ids; only layouts that share memory need the kernels'
    own address-level overlap check, done from host tables.
    """
    src, dst = hop.src, hop.dst
    if not check_overlap:
        gpu_plan(src, dst, layers, device).run()
        return
    if src.fmt.requires_transform(dst.fmt):
        s, d, _ = permute_tables(src, dst, layers)
        dims = dims_of(src.config)
        programs = _pinned_grid(src, dst, permute_step_bytes(dims))
        plan = plan_permute(
            s.expand(),
            src.operand(),
            d.expand(),
            dst.operand(),
            dims,
            device,
            programs=programs,
            layers=layers,
        )
    else:
        s, d, size, align = copy_pairs(src, dst, layers)
        programs = _pinned_grid(src, dst, copy_step_bytes(size, align))
        plan = plan_copy(s.expand(), d.expand(), size, device, programs=programs)
    plan.run()


def gpu_plan(src: Side, dst: Side, layers: range, device: torch.device) -> CopyPlan | PermutePlan:
    """The copy kernel (same format) or the permute kernel from ``src`` to ``dst``, over tables
    on ``device`` (block-major: entry rows of block ``i`` come from ``ids[i]`` of each side),
    without an address-level overlap check."""
    if src.fmt.requires_transform(dst.fmt):
        s, d, aligned = permute_tables(src, dst, layers, device)
        dims = dims_of(src.config)
        programs = _pinned_grid(src, dst, permute_step_bytes(dims))
        return PermutePlan.of_checked_tables(
            src.operand(), s, dst.operand(), d, dims, device, aligned, programs, layers
        )
    s, d, size, align = copy_pairs(src, dst, layers, device)
    programs = _pinned_grid(src, dst, copy_step_bytes(size, align))
    return CopyPlan(s, d, size, align, device, available(device), programs)


def _pinned_grid(src: Side, dst: Side, step_bytes: int) -> int | None:
    """The grid cap of a kernel from ``src`` to ``dst`` whose programs move ``step_bytes`` at
    a time: few programs where a side is pinned memory (the kernel waits on PCIe there, and the
    rest of the GPU stays free; see :func:`pinned_programs`), else none."""
    return pinned_programs(not src.on_gpu, not dst.on_gpu, step_bytes)


def run_copy_engine(
    hop: Hop, layers: range, stream: torch.cuda.Stream, check_overlap: bool
) -> None:
    """Enqueue the hop's copies on ``stream`` through the copy engines (checking every
    address for overlaps only where the two layouts share memory), each run of regions that
    follow one another on both sides as one copy."""
    s, d, size, _ = copy_pairs(hop.src, hop.dst, layers)
    plan = plan_memcpy(s.expand(), d.expand(), size, check_overlap, merge=True)
    plan.run(batched=True, stream=stream, pinned=True)  # both sides are GPU-reachable


def run_host(hop: Hop, layers: range, pool: Executor | None) -> None:
    """Run the hop on the CPU (both sides host memory)."""
    src, dst = hop.src, hop.dst
    if src.fmt.requires_transform(dst.fmt):
        s, d, aligned = permute_tables(src, dst, layers)
        dims = dims_of(src.config)
        PermutePlan.of_checked_tables(
            src.operand(), s, dst.operand(), d, dims, _CPU, aligned, layers=layers
        ).run()
        return
    s, d, size, _ = copy_pairs(src, dst, layers)
    host_copy(s.expand(), d.expand(), size, pool)


def host_copy(src: torch.Tensor, dst: torch.Tensor, size: int, pool: Executor | None) -> None:
    """``memmove`` of ``size`` bytes per pair, neighbours merged, spread over ``pool``'s threads
    (``memmove`` through ctypes releases the GIL)."""
    moves = merge_spans(
        ((s, d, size) for s, d in zip(src.tolist(), dst.tolist(), strict=True)), max_io=64 << 20
    )

    def run(part):
        for s, d, n in part:
            ctypes.memmove(d, s, n)

    if pool is None or len(moves) < 2:
        run(moves)
        return
    parts = [moves[i::8] for i in range(min(8, len(moves)))]
    for future in [pool.submit(run, part) for part in parts]:
        future.result()


def run_disk(hop: Hop, layers: range, pool: Executor | None) -> None:
    """Read a file into host memory (``DISK_READ``) or write host memory into a file."""
    file_side, memory_side = (
        (hop.src, hop.dst) if hop.kind is HopKind.DISK_READ else (hop.dst, hop.src)
    )
    offsets, memory, size, _ = copy_pairs(file_side, memory_side, layers)
    spans = [(o, a, size) for o, a in zip(offsets.entries(), memory.entries(), strict=True)]
    disk = file_side.physical.file
    if hop.kind is HopKind.DISK_READ:
        disk.read(spans, pool)
    else:
        disk.write(spans, pool)


def run_nixl(
    hop: Hop, layers: range, agent: NixlAgent, target: RemoteMemory, message: bytes | None
) -> None:
    """Move the hop's regions with one NIXL READ (remote source) or WRITE (remote destination)
    of ``target``, neighbouring regions merged; returns when the bytes have moved."""
    read = hop.kind is HopKind.NIXL_READ
    local = hop.dst if read else hop.src
    s, d, size, _ = copy_pairs(hop.src, hop.dst, layers)
    local_addrs, remote_addrs = (d, s) if read else (s, d)
    pairs = zip(remote_addrs.entries(), local_addrs.entries(), strict=True)
    spans = merge_spans((r, a, size) for r, a in pairs)
    kind, device_id = memory_of(local.physical.device)
    remote = [(r, n, target.device_id) for r, _, n in spans]
    mine = [(a, n, device_id) for _, a, n in spans]
    agent.transfer(NixlOp.READ if read else NixlOp.WRITE, mine, kind, remote, target, message)


class BouncePool:
    """Pinned fully contiguous layouts to stage transfers through, kept for reuse by size.

    Given a NIXL ``agent``, every buffer is registered with it when allocated and deregistered
    before it is freed, so NIXL can read and write it.
    """

    def __init__(self, keep: int = 4, agent: NixlAgent | None = None) -> None:
        self._free: dict[int, list[MemoryAllocation]] = {}
        self._keep = keep
        self._agent = agent
        self._registrations: dict[MemoryAllocation, object] = {}
        self._lock = threading.Lock()

    def take(self, like: Side, fmt: KvBlockLayout) -> Side:
        """A pinned side holding ``len(like.ids)`` blocks of ``like``'s config, in ``fmt``."""
        n = like.ids.numel()
        config = replace(like.config, num_blocks=n)
        with self._lock:
            kept = self._free.get(config.total_bytes)
            allocation = kept.pop() if kept else None
        if allocation is None:
            allocation = allocate_pinned(config.total_bytes)
            if self._agent is not None:
                registration = self._agent.register([allocation.region], MemKind.DRAM, 0)
                with self._lock:
                    self._registrations[allocation] = registration
        layout = FullyContiguousLayout(config, allocation.region, fmt)
        physical = PhysicalLayout(layout, StorageKind.PINNED, (allocation,))
        return Side(physical, torch.arange(n, dtype=torch.int64), fmt)

    def give_back(self, side: Side) -> None:
        allocation = side.physical.allocations[0]
        with self._lock:
            kept = self._free.setdefault(allocation.size, [])
            if len(kept) < self._keep:
                kept.append(allocation)
                return
            registration = self._registrations.pop(allocation, None)
        if registration is not None:
            self._agent.deregister(registration)
        allocation.release()
