"""The CUDA streams transfers run on, and a device memory pool for their temporaries."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

from kvblocks.errors import InvalidArgumentError
from kvblocks.kernels.cuda_calls import StreamEvent

T = TypeVar("T")

H2D_STREAMS = 4
D2H_STREAMS = 4
#: Sets of streams for the copy-engine steps of staged transfers, and streams in a set: a
#: transfer with many copies spreads them over a set, since a stream holds about a thousand
#: queued copies before the host blocks on it (H100), and scattered pinned blocks make many.
COPY_STREAM_SETS, COPY_STREAMS = 2, 4


class StreamPool:
    """``H2D_STREAMS`` streams for transfers into the GPU and ``D2H_STREAMS`` out of it, handed
    out round robin (device-to-device transfers use the host-to-device ones), and
    ``COPY_STREAM_SETS`` sets of ``COPY_STREAMS`` for the copy-engine steps of staged transfers.
    Created on first use, so a machine without a GPU never touches CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._h2d: list[torch.cuda.Stream] = []
        self._d2h: list[torch.cuda.Stream] = []
        self._copy: list[tuple[torch.cuda.Stream, ...]] = []
        self._next_h2d = itertools.count()
        self._next_d2h = itertools.count()
        self._next_copy = itertools.count()
        self._lock = threading.Lock()

    def _streams(self) -> None:
        with self._lock:
            if not self._h2d:
                self._h2d = [torch.cuda.Stream(self.device) for _ in range(H2D_STREAMS)]
                self._d2h = [torch.cuda.Stream(self.device) for _ in range(D2H_STREAMS)]
                self._copy = [
                    tuple(torch.cuda.Stream(self.device) for _ in range(COPY_STREAMS))
                    for _ in range(COPY_STREAM_SETS)
                ]

    def h2d(self) -> torch.cuda.Stream:
        """The next stream for work that moves bytes into the GPU (or within it)."""
        self._streams()
        return self._h2d[next(self._next_h2d) % H2D_STREAMS]

    def d2h(self) -> torch.cuda.Stream:
        """The next stream for work that moves bytes out of the GPU."""
        self._streams()
        return self._d2h[next(self._next_d2h) % D2H_STREAMS]

    def copies(self) -> tuple[torch.cuda.Stream, ...]:
        """The next set of streams for the copy-engine steps of a staged transfer (beside the
        stream its kernels run on)."""
        self._streams()
        return self._copy[next(self._next_copy) % COPY_STREAM_SETS]


class DeviceMemoryPool:
    """Byte buffers on one GPU for transfer temporaries (staging blocks before a permute).

    ``reserve_bytes`` are allocated up front and kept; buffers given back are kept for reuse
    until the pool holds more than ``release_threshold`` bytes, past which they are freed. A
    buffer given back with :meth:`release_after` is kept aside until its GPU work is done.
    What :meth:`memo` derives from a buffer lives as long as the buffer.
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
        self._pending: list[tuple[torch.cuda.Event, torch.Tensor]] = []  # given back, in use
        self._memos: dict[int, dict[Hashable, object]] = {}  # whole buffer's address -> memos
        self._lock = threading.Lock()
        if reserve_bytes:
            self._free.append(torch.empty(reserve_bytes, dtype=torch.uint8, device=device))

    @property
    def held_bytes(self) -> int:
        """Bytes kept for reuse (not handed out, and free of GPU work)."""
        with self._lock:
            self._reclaim()
            return sum(t.numel() for t in self._free)

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A ``uint8`` buffer of ``nbytes`` (a slice of a kept one where one is big enough)."""
        with self._lock:
            self._reclaim()
            fits = [t for t in self._free if t.numel() >= nbytes]
            if fits:
                whole = min(fits, key=torch.Tensor.numel)
                self._free = [t for t in self._free if t is not whole]
            else:
                whole = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._lent[whole.data_ptr()] = whole
        return whole[:nbytes]

    def memo(self, buffer: torch.Tensor, key: Hashable, make: Callable[[], T]) -> T:
        """What ``make()`` returns, made once per buffer of this pool and ``key`` and kept until
        the pool frees the buffer: for what costs time to derive from a buffer (a layout over
        it, and the address tables built from that).

        Args:
            buffer: a buffer from :meth:`acquire`, not yet given back.
            key: what ``make``'s result depends on besides the buffer's address.
        """
        with self._lock:
            whole = self._lent.get(buffer.data_ptr())
            if whole is None:
                raise InvalidArgumentError("buffer", "was not handed out by this pool")
            memos = self._memos.setdefault(whole.data_ptr(), {})
            if key not in memos:
                memos[key] = make()
            return memos[key]

    def release(self, buffer: torch.Tensor) -> None:
        """Give a buffer from :meth:`acquire` back (its whole underlying allocation)."""
        with self._lock:
            self._keep(self._take_back(buffer))

    def release_after(self, buffer: torch.Tensor, done: StreamEvent) -> None:
        """Give a buffer back that GPU work still uses: it is reused once ``done`` (an event
        recorded after that work) has completed."""
        with self._lock:
            self._pending.append((done, self._take_back(buffer)))

    def _take_back(self, buffer: torch.Tensor) -> torch.Tensor:
        whole = self._lent.pop(buffer.data_ptr(), None)
        if whole is None:
            raise InvalidArgumentError("buffer", "was not handed out by this pool")
        return whole

    def _keep(self, whole: torch.Tensor) -> None:
        self._free.append(whole)
        if self.release_threshold is not None:
            self._free.sort(key=torch.Tensor.numel)
            while self._free and sum(t.numel() for t in self._free) > self.release_threshold:
                self._memos.pop(self._free.pop().data_ptr(), None)

    def _reclaim(self) -> None:
        """Keep the buffers whose GPU work has completed."""
        still = []
        for event, whole in self._pending:
            if event.query():
                self._keep(whole)
            else:
                still.append((event, whole))
        self._pending = still
