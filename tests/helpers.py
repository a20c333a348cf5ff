"""Test helpers: random data, poisoned outputs, bit-exact comparison, raw memory views."""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import torch

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]
ALL_DTYPES = [*FLOAT_DTYPES, *FP8_DTYPES, torch.uint8]

_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The elements of ``t`` reinterpreted as same-width ints (exact comparison, fp8 included)."""
    return t.view(_INT_OF_WIDTH[t.element_size()])


def random_tensor(shape, dtype: torch.dtype, device="cpu", generator=None) -> torch.Tensor:
    """Random normal values of ``dtype`` (bytes 0 to 254 for ``torch.uint8``); never NaN or
    0xFF, so the poison pattern never occurs."""
    if dtype == torch.uint8:
        values = torch.randint(0, 255, shape, dtype=dtype, generator=generator)
    else:
        values = torch.randn(shape, dtype=torch.float32, generator=generator).to(dtype)
    return values.to(device)


def poisoned(shape, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """A tensor whose every element is the all-ones bit pattern (a NaN in every float dtype)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    bits(t).fill_(-1 if t.element_size() > 1 else 0xFF)
    return t


def assert_written(t: torch.Tensor) -> None:
    """Fail if any element still holds the poison pattern."""
    poison = -1 if t.element_size() > 1 else 0xFF
    left = int((bits(t) == poison).sum())
    assert left == 0, f"{left} of {t.numel()} elements were never written"


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = bits(actual) != bits(expected)
    assert not diff.any(), f"{int(diff.sum())} of {actual.numel()} elements differ"


def read_bytes(addr: int, size: int) -> bytes:
    """Copy ``size`` bytes of this process's memory at ``addr``."""
    return ctypes.string_at(addr, size)


def gpu_param(value, *extra):
    """A pytest param that runs only where a GPU is present (marked ``gpu``)."""
    import pytest

    return pytest.param(value, *extra, marks=pytest.mark.gpu, id=str(value))


def alloc(numel: int, dtype: torch.dtype, where: str) -> torch.Tensor:
    """A flat buffer in ``where``: "cpu" (pageable host), "device" (GPU) or "pinned" (host)."""
    if where == "device":
        return torch.empty(numel, dtype=dtype, device="cuda")
    return torch.empty(numel, dtype=dtype, pin_memory=where == "pinned")


def scattered(count: int, shape, dtype, where: str, offset: int = 0, generator=None):
    """``count`` tensors of ``shape`` at shuffled places in one buffer, with a gap between
    neighbours and ``offset`` elements of misalignment. Returns (views, their addresses)."""
    numel = torch.Size(shape).numel()
    stride = numel + 3
    buf = alloc(count * stride + offset, dtype, where)
    bits(buf).fill_(-1 if buf.element_size() > 1 else 0xFF)
    slots = torch.randperm(count, generator=generator).tolist()
    views = [buf[offset + s * stride : offset + s * stride + numel].view(shape) for s in slots]
    return views, [v.data_ptr() for v in views]


def fill_random(views, dtype) -> None:
    for v in views:
        v.copy_(random_tensor(v.shape, dtype))


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def kernel_compiles() -> Iterator[list[str]]:
    """A list that collects every Triton kernel compiled in the ``with`` block (its name and
    the specialization of its arguments)."""
    import triton

    runtime = triton.knobs.runtime
    compiled: list[str] = []
    before = runtime.jit_post_compile_hook

    def record(**kwargs):
        compiled.append(kwargs["repr"])
        return False

    runtime.jit_post_compile_hook = record
    try:
        yield compiled
    finally:
        runtime.jit_post_compile_hook = before
