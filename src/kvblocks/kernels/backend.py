"""Which path a kernel call takes on a given device.

==================  ==========================================================================
``TRITON``          Triton compiled for the GPU; the device is CUDA.
``INTERPRETER``     Triton's interpreter (``TRITON_INTERPRET=1``) on the CPU; same kernel source,
                    used by the CPU tests.
``REFERENCE``       the torch references; any device, no Triton needed.
==================  ==========================================================================
"""

from __future__ import annotations

from enum import Enum

import torch

from kvblocks.kernels._triton import HAS_TRITON, INTERPRETING


class Backend(Enum):
    TRITON = "triton"
    INTERPRETER = "triton-interpreter"
    REFERENCE = "torch-reference"


def interpreting() -> bool:
    """Whether Triton kernels were defined under ``TRITON_INTERPRET=1``."""
    return INTERPRETING


def default_device() -> torch.device:
    """The first GPU where there is one, else the CPU."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else (torch.device("cpu"))
    )


def available(device: torch.device | str | None = None) -> Backend:
    """The path kernels take on ``device`` (default: :func:`default_device`)."""
    device = torch.device(device) if device is not None else default_device()
    if not HAS_TRITON:
        return Backend.REFERENCE
    if device.type == "cuda" and not INTERPRETING:
        return Backend.TRITON
    if device.type == "cpu" and INTERPRETING:
        return Backend.INTERPRETER
    return Backend.REFERENCE


def is_stub_build() -> bool:
    """True where no GPU kernel can run here (the seed API's name for a build without CUDA)."""
    return available() is not Backend.TRITON
