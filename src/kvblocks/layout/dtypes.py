"""The element types kvblocks stores and converts.

Layout math needs only an element's width in bytes; the torch dtype is kept so that the
references and kernels can view raw memory with the right type. fp8 blocks are stored and
moved like any other, as 1-byte elements. ``u8`` is a cache of raw bytes: vLLM keeps its fp8
caches in ``torch.uint8`` tensors, and some caches pack several types into each token (vLLM's
``fp8_ds_mla``: 512 fp8 values, 4 f32 scales and 64 bf16 values in 656 bytes), which kvblocks
moves and permutes byte by byte.
"""

from __future__ import annotations

import torch

from kvblocks.errors import UnsupportedDtypeError

#: Canonical short name -> torch dtype, for every dtype a block may hold.
DTYPES: dict[str, torch.dtype] = {
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f32": torch.float32,
    "f64": torch.float64,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "u8": torch.uint8,
}

_ALIASES: dict[str, str] = {
    "float16": "f16",
    "half": "f16",
    "fp16": "f16",
    "bfloat16": "bf16",
    "float32": "f32",
    "float": "f32",
    "fp32": "f32",
    "float64": "f64",
    "double": "f64",
    "fp64": "f64",
    "float8_e4m3fn": "fp8_e4m3",
    "float8_e5m2": "fp8_e5m2",
    "uint8": "u8",
    "byte": "u8",
}

_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def parse_dtype(value: torch.dtype | str, argument: str = "dtype") -> torch.dtype:
    """Return the torch dtype for ``value`` (a torch dtype or a name such as ``"bf16"``).

    Raises:
        UnsupportedDtypeError: ``value`` is not one of :data:`DTYPES` (or an alias of one).
    """
    if isinstance(value, torch.dtype):
        if value in _NAMES:
            return value
    elif isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        key = _ALIASES.get(key, key)
        if key in DTYPES:
            return DTYPES[key]
    supported = ", ".join(DTYPES)
    raise UnsupportedDtypeError(argument, f"must be one of {supported}, got {value!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical short name of a supported dtype (``torch.bfloat16`` -> ``"bf16"``)."""
    return _NAMES[parse_dtype(dtype)]
