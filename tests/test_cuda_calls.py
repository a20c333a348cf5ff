"""CUDA calls made with the GIL held (kvblocks.kernels.cuda_calls): events that order streams,
copies between pinned and device memory, timing, and that none of them hands the GIL to a
busy Python thread. Without a GPU they are unavailable and say so; ``host_ids`` builds the
transfers' id tensors and ``StridedTable.entries`` their address lists without torch ops,
everywhere."""

import sys
import threading
import time
from contextlib import contextmanager

import pytest
import torch

from kvblocks.errors import BackendUnavailableError, KvBlocksError
from kvblocks.kernels import cuda_calls
from kvblocks.kernels.addresses import StridedTable, host_ids
from kvblocks.kernels.cuda_calls import StreamEvent, memcpy_async, wait_for

POISON = 0xAB
#: GPU cycles that keep a stream busy for some milliseconds (torch.cuda._sleep).
BUSY_CYCLES = 50_000_000


@contextmanager
def python_loop():
    """A thread counting in a Python loop, which never waits, at Python's default 5 ms
    switch interval."""
    stop = threading.Event()

    def count() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    thread = threading.Thread(target=count, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)


@pytest.mark.parametrize("values", [[5, 0, 3, 2**40], [7], []], ids=["four", "one", "none"])
def test_host_ids_are_int64_cpu_tensors_of_the_values(values):
    ids = host_ids(values)
    assert ids.dtype == torch.int64 and ids.device.type == "cpu" and ids.dim() == 1
    assert ids.tolist() == values


def test_host_ids_refuse_what_is_not_an_int64():
    with pytest.raises(TypeError):
        host_ids([1, 2.5])
    with pytest.raises(OverflowError):
        host_ids([2**63])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_the_calls_say_they_cannot_run():
    assert not cuda_calls.available()
    with pytest.raises(BackendUnavailableError, match="libcuda"):
        StreamEvent(torch.device("cuda", 0))


@pytest.mark.gpu
def test_an_event_orders_one_stream_after_another():
    """Work on ``later`` queued after it waits for the event runs after ``earlier``'s slow
    write, and the host learns of it through query and synchronize."""
    earlier, later = torch.cuda.Stream(), torch.cuda.Stream()
    data = torch.zeros(1 << 20, device="cuda")
    copy = torch.full_like(data, float(POISON))
    with torch.cuda.stream(earlier):
        torch.cuda._sleep(BUSY_CYCLES)
        data.fill_(7.0)
    event = StreamEvent.recorded(earlier)
    assert not event.query()
    event.wait(later)
    with torch.cuda.stream(later):
        copy.copy_(data)
    event.synchronize()
    assert event.query()
    later.synchronize()
    assert bool((copy == 7.0).all())


@pytest.mark.gpu
def test_torch_streams_wait_for_events_and_streams():
    """``torch.cuda.Stream.wait_event`` takes a StreamEvent; ``wait_for`` stands for
    ``Stream.wait_stream``."""
    earlier, later = torch.cuda.Stream(), torch.cuda.Stream()
    data = torch.zeros(1 << 20, device="cuda")
    copies = [torch.full_like(data, float(POISON)) for _ in range(2)]
    with torch.cuda.stream(earlier):
        torch.cuda._sleep(BUSY_CYCLES)
        data.fill_(3.0)
    later.wait_event(StreamEvent.recorded(earlier))
    with torch.cuda.stream(later):
        copies[0].copy_(data)
    with torch.cuda.stream(earlier):
        torch.cuda._sleep(BUSY_CYCLES)
        data.fill_(4.0)
    wait_for(later, earlier)
    with torch.cuda.stream(later):
        copies[1].copy_(data)
    later.synchronize()
    assert bool((copies[0] == 3.0).all()) and bool((copies[1] == 4.0).all())


@pytest.mark.gpu
def test_memcpy_async_moves_pinned_and_device_spans():
    """Pairs of odd sizes at odd offsets, pinned -> device and back; the bytes around them
    keep their poison."""
    gen = torch.Generator().manual_seed(3)
    pinned = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=gen).pin_memory()
    device = torch.full((1 << 16,), POISON, dtype=torch.uint8, device="cuda")
    back = torch.full((1 << 16,), POISON, dtype=torch.uint8).pin_memory()
    spans = [(1, 100, 999), (5_000, 3, 4_097), (40_001, 20_000, 1)]  # (src at, dst at, bytes)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    memcpy_async(
        [device.data_ptr() + d for _, d, _ in spans],
        [pinned.data_ptr() + s for s, _, _ in spans],
        [n for _, _, n in spans],
        stream,
    )
    memcpy_async([back.data_ptr()], [device.data_ptr()], [device.numel()], stream)
    stream.synchronize()
    want = torch.full_like(back, POISON)
    for s, d, n in spans:
        want[d : d + n] = pinned[s : s + n]
    assert torch.equal(back, want)


@pytest.mark.gpu
def test_timing_events_measure_the_gpu_time_between_them():
    stream = torch.cuda.Stream()
    start = StreamEvent.recorded(stream, timing=True)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(BUSY_CYCLES)
    end = StreamEvent.recorded(stream, timing=True)
    end.synchronize()
    assert 1e-4 < start.seconds_until(end) < 10
    plain = StreamEvent.recorded(stream)
    plain.synchronize()
    with pytest.raises(KvBlocksError, match="cuEventElapsedTime"):
        start.seconds_until(plain)


@pytest.mark.gpu
def test_the_calls_keep_the_gil_beside_a_busy_python_thread():
    """200 records, waits and copies take well under a millisecond each: were any of them to
    let the GIL go, winning it back from the loop would take up to 5 ms, about a second in
    all."""
    stream = torch.cuda.Stream()
    src = torch.randint(0, 256, (4096,), dtype=torch.uint8).pin_memory()
    dst = torch.empty(4096, dtype=torch.uint8, device="cuda")
    with python_loop():
        time.sleep(0.05)
        started = time.perf_counter()
        for _ in range(200):
            event = StreamEvent.recorded(stream)
            event.wait(stream)
            memcpy_async([dst.data_ptr()], [src.data_ptr()], [4096], stream)
        seconds = time.perf_counter() - started
    stream.synchronize()
    assert torch.equal(dst.cpu(), src)
    assert seconds < 0.1, f"{seconds * 1e3:.0f} ms"


@pytest.mark.parametrize(("blocks", "per_block"), [(1, 1), (7, 1), (5, 6), (0, 3)])
def test_strided_table_entries_are_its_expansion(blocks, per_block):
    """``entries`` (Python ints, for NIXL's and the disk's descriptors) holds what ``expand``
    does, block-major."""
    gen = torch.Generator().manual_seed(blocks * 10 + per_block)
    ids = torch.randint(0, 1000, (blocks,), generator=gen)
    bases = torch.randint(1, 1 << 40, (per_block,), generator=gen)
    table = StridedTable(ids, bases, 4096)
    assert table.entries() == table.expand().tolist()
    assert len(table.entries()) == len(table)
