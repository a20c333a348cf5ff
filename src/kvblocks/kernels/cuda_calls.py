"""Stream-ordered CUDA calls that keep the GIL: events recorded and waited on, and copies
between pinned and device memory enqueued on the copy engine.

Each of these calls only enqueues work and returns within microseconds, yet torch's and
cuda-bindings' wrappers let the GIL go around them. A thread that lets the GIL go must win it
back, and beside a Python thread that never blocks that takes up to a whole switch interval
(``sys.getswitchinterval()``, 5 ms by default): a staged transfer of 256 blocks handed the GIL
over about 130 times (``docs/performance.md``). Called through ``ctypes.PyDLL``, the CUDA
driver runs with the GIL held. A wait that blocks (:meth:`StreamEvent.synchronize`) still
lets it go.

Every call makes the primary context of its stream's device current for its duration (the
context torch uses), so that it works on any thread and with the null stream of any device.
Streams are ``torch.cuda.Stream`` s; :class:`StreamEvent` stands in for ``torch.cuda.Event``
where transfers record and wait (``query``, ``synchronize``, and ``wait``, which torch's
``Stream.wait_event`` calls).
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from kvblocks.errors import BackendUnavailableError, KvBlocksError

_SUCCESS, _NOT_READY = 0, 600
_EVENT_DISABLE_TIMING = 0x2

_c = ctypes
#: (name in libcuda, argument types) of each call made.
_SIGNATURES = {
    "cuInit": [_c.c_uint],
    "cuDeviceGet": [_c.POINTER(_c.c_int), _c.c_int],
    "cuDevicePrimaryCtxRetain": [_c.POINTER(_c.c_void_p), _c.c_int],
    "cuCtxPushCurrent_v2": [_c.c_void_p],
    "cuCtxPopCurrent_v2": [_c.POINTER(_c.c_void_p)],
    "cuEventCreate": [_c.POINTER(_c.c_void_p), _c.c_uint],
    "cuEventDestroy_v2": [_c.c_void_p],
    "cuEventRecord": [_c.c_void_p, _c.c_void_p],
    "cuEventQuery": [_c.c_void_p],
    "cuEventSynchronize": [_c.c_void_p],
    "cuEventElapsedTime": [_c.POINTER(_c.c_float), _c.c_void_p, _c.c_void_p],
    "cuStreamWaitEvent": [_c.c_void_p, _c.c_void_p, _c.c_uint],
    "cuMemcpyAsync": [_c.c_uint64, _c.c_uint64, _c.c_size_t, _c.c_void_p],
    "cuGetErrorName": [_c.c_int, _c.POINTER(_c.c_char_p)],
}


class _Driver:
    """libcuda's calls, twice: through ``PyDLL`` (the GIL held) and ``CDLL`` (the GIL let go,
    for calls that block)."""

    def __init__(self) -> None:
        self.held, self.released = ctypes.PyDLL("libcuda.so.1"), ctypes.CDLL("libcuda.so.1")
        for lib in (self.held, self.released):
            for name, argtypes in _SIGNATURES.items():
                function = getattr(lib, name)
                function.argtypes, function.restype = argtypes, ctypes.c_int
        self.check(self.held.cuInit(0), "cuInit")
        self._contexts: dict[int, ctypes.c_void_p] = {}
        self._lock = threading.Lock()

    def check(self, result: int, call: str) -> None:
        if result != _SUCCESS:
            name = ctypes.c_char_p()
            self.held.cuGetErrorName(result, ctypes.byref(name))
            raise KvBlocksError(f"{call} failed: {(name.value or b'CUDA error').decode()}")

    def context(self, device: int) -> ctypes.c_void_p:
        """The primary context of GPU ``device`` (retained once, as torch's is)."""
        with self._lock:
            if device not in self._contexts:
                handle, ctx = ctypes.c_int(), ctypes.c_void_p()
                self.check(self.held.cuDeviceGet(ctypes.byref(handle), device), "cuDeviceGet")
                self.check(
                    self.held.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), handle),
                    "cuDevicePrimaryCtxRetain",
                )
                self._contexts[device] = ctx
            return self._contexts[device]


@functools.cache
def _driver() -> _Driver | None:
    if not torch.cuda.is_available():
        return None
    try:
        return _Driver()
    except (OSError, AttributeError, KvBlocksError):
        return None


def available() -> bool:
    """Whether these calls can be made here (a GPU and its driver's library)."""
    return _driver() is not None


def _require() -> _Driver:
    driver = _driver()
    if driver is None:
        raise BackendUnavailableError("CUDA driver calls need a GPU and libcuda.so.1")
    return driver


@contextmanager
def _current(driver: _Driver, device: torch.device) -> Iterator[None]:
    """``device``'s primary context current on this thread for the block."""
    index = torch.cuda.current_device() if device.index is None else device.index
    driver.check(driver.held.cuCtxPushCurrent_v2(driver.context(index)), "cuCtxPushCurrent")
    try:
        yield
    finally:
        driver.held.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))


class StreamEvent:
    """A CUDA event, recorded and waited on with the GIL held.

    Args:
        device: the GPU whose streams it is recorded on.
        timing: whether it keeps the time it is reached at, for :meth:`seconds_until`
            (timing costs the GPU a little at each record).
    """

    def __init__(self, device: torch.device, timing: bool = False) -> None:
        self._driver = _require()
        self.device = device
        self._handle = ctypes.c_void_p()
        flags = 0 if timing else _EVENT_DISABLE_TIMING
        with _current(self._driver, device):
            self._driver.check(
                self._driver.held.cuEventCreate(ctypes.byref(self._handle), flags),
                "cuEventCreate",
            )

    @classmethod
    def recorded(cls, stream: torch.cuda.Stream, timing: bool = False) -> StreamEvent:
        """A new event, recorded on ``stream``."""
        event = cls(stream.device, timing)
        event.record(stream)
        return event

    def record(self, stream: torch.cuda.Stream) -> None:
        """Mark the work queued on ``stream`` so far."""
        with _current(self._driver, stream.device):
            self._driver.check(
                self._driver.held.cuEventRecord(self._handle, stream.cuda_stream), "cuEventRecord"
            )

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make work queued on ``stream`` later (default: the current stream of the event's
        GPU) wait for the work this event marks, on the GPU; the host goes on at once."""
        stream = stream if stream is not None else torch.cuda.current_stream(self.device)
        with _current(self._driver, stream.device):
            self._driver.check(
                self._driver.held.cuStreamWaitEvent(stream.cuda_stream, self._handle, 0),
                "cuStreamWaitEvent",
            )

    def query(self) -> bool:
        """Whether the work this event marks has completed (an event never recorded has)."""
        with _current(self._driver, self.device):
            result = self._driver.held.cuEventQuery(self._handle)
        if result == _NOT_READY:
            return False
        self._driver.check(result, "cuEventQuery")
        return True

    def synchronize(self) -> None:
        """Block until the work this event marks has completed, letting the GIL go meanwhile.

        Raises:
            KvBlocksError: the GPU reported an error from that work.
        """
        with _current(self._driver, self.device):
            result = self._driver.released.cuEventSynchronize(self._handle)
        self._driver.check(result, "cuEventSynchronize")

    def seconds_until(self, end: StreamEvent) -> float:
        """Seconds of GPU time from this event to ``end``, both made with ``timing`` and
        completed.

        Raises:
            KvBlocksError: either was made without timing, or has not completed.
        """
        milliseconds = ctypes.c_float()
        with _current(self._driver, self.device):
            result = self._driver.held.cuEventElapsedTime(
                ctypes.byref(milliseconds), self._handle, end._handle
            )
        self._driver.check(result, "cuEventElapsedTime")
        return milliseconds.value / 1e3

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle:
            try:
                with _current(self._driver, self.device):
                    self._driver.held.cuEventDestroy_v2(handle)
            except Exception:  # at interpreter exit the driver may be gone already
                pass


def wait_for(stream: torch.cuda.Stream, earlier: torch.cuda.Stream) -> StreamEvent:
    """Make work queued on ``stream`` from now on wait for the work queued on ``earlier`` so
    far (``torch.cuda.Stream.wait_stream``, with the GIL held); returns the event between
    them."""
    event = StreamEvent.recorded(earlier)
    event.wait(stream)
    return event


def memcpy_async(
    dst: Sequence[int], src: Sequence[int], sizes: Sequence[int], stream: torch.cuda.Stream
) -> None:
    """Enqueue copies ``src[i] -> dst[i]`` of ``sizes[i]`` bytes on ``stream``, one call per
    pair, with the GIL held.

    Only for pinned host memory and device memory, where each call returns at once (a copy
    from pageable memory would hold the GIL until it is done). The caller has checked the
    spans.
    """
    driver = _require()
    with _current(driver, stream.device):
        handle = stream.cuda_stream
        for d, s, n in zip(dst, src, sizes, strict=True):
            driver.check(driver.held.cuMemcpyAsync(d, s, n, handle), "cuMemcpyAsync")
