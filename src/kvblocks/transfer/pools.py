"""The CUDA streams transfers run on, and a device memory pool for their temporaries."""

from __future__ import annotations

import itertools
import threading

import torch

from kvblocks.errors import InvalidArgumentError

H2D_STREAMS = 4
D2H_STREAMS = 4


class StreamPool:
    """``H2D_STREAMS`` streams for transfers into the GPU and ``D2H_STREAMS`` out of it, handed
    out round robin (device-to-device transfers use the host-to-device ones). Created on first
    use, so a machine without a GPU never touches CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._h2d: list[torch.cuda.Stream] = []
        self._d2h: list[torch.cuda.Stream] = []
        self._next_h2d = itertools.count()
        self._next_d2h = itertools.count()
        self._lock = threading.Lock()

    def _streams(self) -> None:
        with self._lock:
            if not self._h2d:
                self._h2d = [torch.cuda.Stream(self.device) for _ in range(H2D_STREAMS)]
                self._d2h = [torch.cuda.Stream(self.device) for _ in range(D2H_STREAMS)]

    def h2d(self) -> torch.cuda.Stream:
        """The next stream for work that moves bytes into the GPU (or within it)."""
        self._streams()
        return self._h2d[next(self._next_h2d) % H2D_STREAMS]

    def d2h(self) -> torch.cuda.Stream:
        """The next stream for work that moves bytes out of the GPU."""
        self._streams()
        return self._d2h[next(self._next_d2h) % D2H_STREAMS]


class DeviceMemoryPool:
    """Byte buffers on one GPU for transfer temporaries (staging blocks before a permute).

    ``reserve_bytes`` are allocated up front and kept; buffers given back are kept for reuse
    until the pool holds more than ``release_threshold`` bytes, past which they are freed.
    """

    def __init__(
        self, device: torch.device, reserve_bytes: int = 0, release_threshold: int | None = None
    ) -> None:
        for name, value in (
            ("reserve_bytes", reserve_bytes),
            ("release_threshold", release_threshold),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise InvalidArgumentError(name, f"must be a non-negative int, got {value!r}")
        self.device = device
        self.release_threshold = release_threshold
        self._free: list[torch.Tensor] = []
        self._lent: dict[int, torch.Tensor] = {}  # address handed out -> its whole buffer
        self._lock = threading.Lock()
        if reserve_bytes:
            self._free.append(torch.empty(reserve_bytes, dtype=torch.uint8, device=device))

    @property
    def held_bytes(self) -> int:
        """Bytes kept for reuse (not handed out)."""
        return sum(t.numel() for t in self._free)

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A ``uint8`` buffer of ``nbytes`` (a slice of a kept one where one is big enough)."""
        with self._lock:
            fits = [t for t in self._free if t.numel() >= nbytes]
            if fits:
                whole = min(fits, key=torch.Tensor.numel)
                self._free = [t for t in self._free if t is not whole]
            else:
                whole = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._lent[whole.data_ptr()] = whole
        return whole[:nbytes]

    def release(self, buffer: torch.Tensor) -> None:
        """Give a buffer from :meth:`acquire` back (its whole underlying allocation)."""
        with self._lock:
            whole = self._lent.pop(buffer.data_ptr(), None)
            if whole is None:
                raise InvalidArgumentError("buffer", "was not handed out by this pool")
            self._free.append(whole)
            if self.release_threshold is not None:
                self._free.sort(key=torch.Tensor.numel)
                while self._free and self.held_bytes > self.release_threshold:
                    self._free.pop()
