"""Allocations: the storage behind a layout, with release and a byte view.

Memory allocations hold a ``uint8`` torch tensor. Host memory is page aligned (4096 bytes), so
files opened with ``O_DIRECT`` can read into it and write from it directly. Without a GPU,
device and pinned memory are system memory standing in for them (``emulated`` is true).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from kvblocks.errors import (
    BackendUnavailableError,
    InvalidArgumentError,
    LayoutReleasedError,
    StorageError,
)
from kvblocks.layout import MemoryRegion
from kvblocks.storage.kinds import StorageKind
from kvblocks.storage.numa import allocate_on_node

#: Alignment of host allocations: a page, what O_DIRECT needs.
HOST_ALIGN = 4096


class Allocation(ABC):
    """Storage of ``size`` bytes of one :class:`StorageKind`; usable until :meth:`release`."""

    kind: StorageKind
    size: int

    def __init__(self, kind: StorageKind, size: int) -> None:
        self.kind = kind
        self.size = size
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def check_alive(self) -> None:
        """Raise :class:`LayoutReleasedError` if this allocation was released."""
        if self._released:
            raise LayoutReleasedError(f"this {self.kind.value} allocation was released")

    def release(self) -> None:
        """Give the storage back. Releasing twice is harmless; any later use raises."""
        if not self._released:
            self._released = True
            self._free()

    @abstractmethod
    def _free(self) -> None: ...

    @abstractmethod
    def view(self) -> torch.Tensor:
        """The bytes as a ``uint8`` tensor of ``size`` elements (no copy where possible)."""


class MemoryAllocation(Allocation):
    """Device, pinned or system memory held by a tensor.

    Attributes:
        emulated: system memory standing in for device or pinned memory (no GPU here).
        owned: the memory was allocated here (False for an engine's tensors, which are only
            referenced and never freed by kvblocks).
        numa_node: the NUMA node its pages were placed on (None: wherever the system put
            them; see :mod:`~kvblocks.storage.numa`).
    """

    def __init__(
        self,
        kind: StorageKind,
        tensor: torch.Tensor,
        emulated: bool = False,
        owned: bool = True,
        numa_node: int | None = None,
    ) -> None:
        super().__init__(kind, tensor.numel() * tensor.element_size())
        self._tensor: torch.Tensor | None = tensor
        self.emulated = emulated
        self.owned = owned
        self.numa_node = numa_node

    @property
    def device(self) -> torch.device:
        """Where the bytes are: ``cuda:N`` for device memory on a GPU, else ``cpu``."""
        self.check_alive()
        return self._tensor.device

    @property
    def region(self) -> MemoryRegion:
        """Start address and size."""
        self.check_alive()
        return MemoryRegion(self._tensor.data_ptr(), self.size)

    def view(self) -> torch.Tensor:
        self.check_alive()
        return self._tensor.view(torch.uint8).reshape(-1)

    def _free(self) -> None:
        self._tensor = None


def _aligned_host(size: int, pin: bool) -> torch.Tensor:
    # torch's caching host allocator may hand out pinned memory that is not page aligned
    # (seen on torch 2.11), so pinned memory is over-allocated and sliced like the rest.
    raw = torch.empty(size + HOST_ALIGN, dtype=torch.uint8, pin_memory=pin)
    skip = -raw.data_ptr() % HOST_ALIGN
    return raw[skip : skip + size]


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidArgumentError("size", f"must be a positive number of bytes, got {size!r}")
    return size


def allocate_device(size: int, device_id: int = 0) -> MemoryAllocation:
    """``size`` bytes of GPU memory on ``device_id`` (system memory where there is no GPU)."""
    _check_size(size)
    if not torch.cuda.is_available():
        return MemoryAllocation(StorageKind.DEVICE, _aligned_host(size, False), emulated=True)
    count = torch.cuda.device_count()
    if isinstance(device_id, bool) or not isinstance(device_id, int) or not 0 <= device_id < count:
        raise InvalidArgumentError("device_id", f"must be in [0, {count}), got {device_id!r}")
    try:
        tensor = torch.empty(size, dtype=torch.uint8, device=f"cuda:{device_id}")
    except torch.OutOfMemoryError as exc:
        raise StorageError(f"cannot allocate {size} bytes on cuda:{device_id}: {exc}") from None
    return MemoryAllocation(StorageKind.DEVICE, tensor)


def allocate_pinned(size: int, numa_node: int | None = None) -> MemoryAllocation:
    """``size`` bytes of page-locked host memory (plain system memory where there is no GPU);
    with ``numa_node``, its pages on that NUMA node while it has room
    (:func:`~kvblocks.storage.numa.allocate_on_node`).

    Raises:
        InvalidArgumentError: ``size`` is not a positive int, or ``numa_node`` not an online
            node.
        StorageError: the memory cannot be allocated.
    """
    _check_size(size)
    gpu = torch.cuda.is_available()
    if numa_node is not None:
        tensor = allocate_on_node(size, numa_node, pin=gpu)
        return MemoryAllocation(StorageKind.PINNED, tensor, emulated=not gpu, numa_node=numa_node)
    try:
        tensor = _aligned_host(size, pin=gpu)
    except RuntimeError as exc:
        raise StorageError(f"cannot allocate {size} bytes of pinned memory: {exc}") from None
    return MemoryAllocation(StorageKind.PINNED, tensor, emulated=not gpu)


def allocate_system(size: int) -> MemoryAllocation:
    """``size`` bytes of pageable host memory, page aligned."""
    _check_size(size)
    try:
        tensor = _aligned_host(size, pin=False)
    except RuntimeError as exc:
        raise StorageError(f"cannot allocate {size} bytes of system memory: {exc}") from None
    return MemoryAllocation(StorageKind.SYSTEM, tensor)


def wrap_tensor(tensor: torch.Tensor, argument: str = "tensor") -> MemoryAllocation:
    """An allocation over a tensor someone else owns (an engine's KV cache), without a copy.

    The kind follows the tensor: CUDA -> device, pinned CPU -> pinned, other CPU -> system.

    Raises:
        InvalidArgumentError: not a contiguous CPU or CUDA tensor.
    """
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgumentError(argument, f"must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_contiguous():
        raise InvalidArgumentError(argument, "must be contiguous")
    if tensor.device.type == "cuda":
        kind = StorageKind.DEVICE
    elif tensor.device.type == "cpu":
        kind = StorageKind.PINNED if tensor.is_pinned() else StorageKind.SYSTEM
    else:
        raise InvalidArgumentError(
            argument, f"must be on a CPU or CUDA device, got {tensor.device}"
        )
    return MemoryAllocation(kind, tensor, owned=False)


class RemoteAllocation(Allocation):
    """Memory of another worker, known by its address there; moved only through NIXL."""

    def __init__(self, region: MemoryRegion) -> None:
        super().__init__(StorageKind.REMOTE, region.size)
        self.region = region

    def view(self) -> torch.Tensor:
        raise BackendUnavailableError("remote memory has no local view; it is reached through NIXL")

    def _free(self) -> None:
        pass
