"""Checksums and fill patterns of blocks, for verifying transfers and for tests.

A block's checksum is BLAKE3 over its bytes as stored, region by region in ``(layer, outer)``
order (for a fully contiguous layout, simply the block's span). So the same block in a fully
contiguous and a layer-separate layout of the same format has the same checksum, and the same
data in two formats (NHD and universal, say) does not. Layer checksums cover the ``no`` regions
of one layer of one block.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import blake3
import torch

from kvblocks.errors import BackendUnavailableError, InvalidArgumentError
from kvblocks.kernels.reference import permute_blocks
from kvblocks.layout import KvBlockLayout, MemoryRegion
from kvblocks.storage import MemoryAllocation, PhysicalLayout, StorageKind
from kvblocks.transfer.executor import dims_of


def _spans(physical: PhysicalLayout, block_id: int, layers: range | None) -> list[MemoryRegion]:
    layout = physical.layout
    if layout.is_fully_contiguous and layers is None:
        return [layout.block_region(block_id)]
    no = layout.config.outer_dim
    return [layout.region(block_id, l, o) for l in layout.layer_range(layers) for o in range(no)]


def read_bytes(physical: PhysicalLayout, region: MemoryRegion) -> bytes:
    """The bytes of one region of ``physical`` (copied to the host)."""
    physical.check_alive()
    if physical.storage is StorageKind.DISK:
        fd = os.open(physical.file.path, os.O_RDONLY)
        try:
            return os.pread(fd, region.size, region.addr)
        finally:
            os.close(fd)
    host = _memory_slice(physical, region).cpu()  # kept alive while its bytes are copied
    return bytes(_host_buffer(host))


def _host_buffer(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU uint8 tensor's bytes as a buffer, without a copy (and without numpy,
    which a plain install need not have). The buffer does not keep ``tensor`` alive: the caller
    must, while the buffer is used."""
    return _buffer_at(tensor.data_ptr(), tensor.numel())


def _buffer_at(addr: int, nbytes: int) -> memoryview:
    """``nbytes`` of host memory at ``addr`` as a buffer, without a copy."""
    return memoryview((ctypes.c_char * nbytes).from_address(addr)).cast("B")


def _memory_slice(physical: PhysicalLayout, region: MemoryRegion) -> torch.Tensor:
    if physical.storage is StorageKind.REMOTE:
        raise BackendUnavailableError("remote blocks are checked on the worker that holds them")
    allocation, start = _holding(physical, region)
    return allocation.view()[start : start + region.size]


def _holding(physical: PhysicalLayout, region: MemoryRegion) -> tuple[MemoryAllocation, int]:
    """The allocation of ``physical`` that holds ``region``, and where in it ``region``
    starts (bytes).

    Raises:
        InvalidArgumentError: no allocation holds all of ``region``.
    """
    for allocation in physical.allocations:
        assert isinstance(allocation, MemoryAllocation)
        start = region.addr - allocation.region.addr
        if 0 <= start and start + region.size <= allocation.size:
            return allocation, start
    raise InvalidArgumentError("region", f"{region} is not inside this layout's memory")


#: Threads that hash the blocks of host memory, a block each at a time (see
#: :func:`block_checksums`).
HASH_THREADS = 4


@functools.cache
def _hashing_threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="kvblocks-hash")


def block_checksums(physical: PhysicalLayout, block_ids: Sequence[int]) -> list[str]:
    """BLAKE3 (hex) of each block's bytes.

    Blocks of host memory are hashed on ``HASH_THREADS`` threads. BLAKE3 lets the GIL go
    while it hashes (an input of 2 KiB or more), so they hash at once; and beside a Python
    thread that never blocks, where winning the GIL back after each block takes up to a
    switch interval (5 ms by default), those waits overlap instead of adding up (64 blocks
    on the development machine's CPU: 80 ms instead of 340 to 370)."""
    spans = [_spans(physical, b, None) for b in block_ids]
    device = physical.device
    if len(spans) > 1 and device is not None and device.type == "cpu":
        return list(_hashing_threads().map(functools.partial(_checksum, physical), spans))
    return [_checksum(physical, block_spans) for block_spans in spans]


def block_checksums_as(
    physical: PhysicalLayout, block_ids: Sequence[int], fmt: KvBlockLayout
) -> list[str]:
    """BLAKE3 (hex) of each block's bytes as they read in ``fmt``: converted from the layout's
    format by the torch reference, so a block can be compared across a format change. Plain
    :func:`block_checksums` where the formats are the same (or either is ``Unknown``)."""
    own = physical.kv_format
    if own.dim_order is None or fmt.dim_order is None or not own.requires_transform(fmt):
        return block_checksums(physical, block_ids)
    dims = dims_of(physical.config)
    sums = []
    for b in block_ids:
        stored = b"".join(read_bytes(physical, span) for span in _spans(physical, b, None))
        block = torch.frombuffer(bytearray(stored), dtype=dims.dtype).view(1, -1)
        converted = permute_blocks(block, dims, own, fmt).view(torch.uint8)
        sums.append(blake3.blake3(_host_buffer(converted)).hexdigest())
    return sums


def layer_checksums(
    physical: PhysicalLayout, block_ids: Sequence[int], layers: range | None = None
) -> list[list[str]]:
    """BLAKE3 (hex) of each ``(block, layer)``: ``result[i][j]`` is block ``block_ids[i]``,
    layer ``layers[j]``."""
    layers = physical.layout.layer_range(layers)
    return [
        [_checksum(physical, _spans(physical, b, range(l, l + 1))) for l in layers]
        for b in block_ids
    ]


#: Spans at least this large are hashed on several threads (the digest is the same).
THREADED_HASH_BYTES = 1 << 20


def _checksum(physical: PhysicalLayout, spans: list[MemoryRegion]) -> str:
    threads = 1
    if sum(span.size for span in spans) >= THREADED_HASH_BYTES:
        threads = blake3.blake3.AUTO
    hasher = blake3.blake3(max_threads=threads)
    device = physical.device
    host = device is not None and device.type == "cpu"
    for span in spans:
        if host:  # hashed in place, no copy
            hasher.update(_host_span(physical, span))
        else:
            hasher.update(read_bytes(physical, span))
    return hasher.hexdigest()


def _host_span(physical: PhysicalLayout, region: MemoryRegion) -> memoryview:
    """The bytes of ``region`` of ``physical`` (host memory) as a buffer, without a copy and
    without a torch op (each lets the GIL go: see ``kvblocks.kernels.cuda_calls``). The
    caller keeps ``physical`` alive while the buffer is used."""
    physical.check_alive()
    _holding(physical, region)
    return _buffer_at(region.addr, region.size)


@dataclass(frozen=True)
class FillPattern:
    """Bytes to fill blocks with: one constant, or a sequence that differs for every block,
    layer, outer chunk and byte (so a misplaced region is caught)."""

    constant: int | None = None

    @classmethod
    def sequential(cls) -> FillPattern:
        return cls(None)

    @classmethod
    def of_constant(cls, value: int) -> FillPattern:
        if not 0 <= value <= 255:
            raise InvalidArgumentError("value", f"must be a byte in [0, 255], got {value}")
        return cls(value)

    def bytes_for(self, block_id: int, layer: int, outer: int, size: int, device) -> torch.Tensor:
        if self.constant is not None:
            return torch.full((size,), self.constant, dtype=torch.uint8, device=device)
        start = (block_id * 131 + layer * 31 + outer * 17) % 251
        return ((torch.arange(size, device=device) + start) % 251).to(torch.uint8)


def fill_blocks(physical: PhysicalLayout, block_ids: Sequence[int], pattern: FillPattern) -> None:
    """Write ``pattern`` into ``block_ids``: a fully contiguous block as one span (layer and
    outer 0 in the pattern), a layer-separate block region by region."""
    physical.check_alive()
    layout = physical.layout
    disk = physical.storage is StorageKind.DISK
    fd = os.open(physical.file.path, os.O_WRONLY) if disk else None
    try:
        for b in block_ids:
            if layout.is_fully_contiguous:
                pieces = [(0, 0, layout.block_region(b))]
            else:
                nl, no = layout.config.num_layers, layout.config.outer_dim
                pieces = [(l, o, layout.region(b, l, o)) for l in range(nl) for o in range(no)]
            for l, o, region in pieces:
                if disk:
                    data = pattern.bytes_for(b, l, o, region.size, "cpu")
                    os.pwrite(fd, _host_buffer(data), region.addr)
                else:
                    target = _memory_slice(physical, region)
                    target.copy_(pattern.bytes_for(b, l, o, region.size, target.device))
    finally:
        if fd is not None:
            os.close(fd)
