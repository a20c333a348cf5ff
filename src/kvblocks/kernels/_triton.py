"""Triton, or a stand-in that lets kernel modules import where Triton is not installed.

With the stand-in, ``@triton.jit`` leaves the function as plain Python and ``tl.constexpr`` is
only an annotation; :func:`kvblocks.kernels.backend.available` then reports the torch
reference, and no kernel is ever launched.
"""

import os
import threading
from contextlib import nullcontext

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised in a subprocess by the tests
    from types import SimpleNamespace

    HAS_TRITON = False

    def _jit(fn=None, **_options):
        return fn if fn is not None else (lambda f: f)

    triton = SimpleNamespace(jit=_jit, cdiv=lambda a, b: -(-a // b))
    tl = SimpleNamespace(constexpr=object)

#: Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``): Triton decides it
#: when the kernels are defined, at import.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: Held around every kernel launch. Triton's interpreter swaps module-level functions while a
#: kernel runs, so two threads must not run kernels at once under it; on a GPU launches need
#: no lock.
LAUNCH_LOCK = threading.Lock() if INTERPRETING else nullcontext()

__all__ = ["HAS_TRITON", "INTERPRETING", "LAUNCH_LOCK", "tl", "triton"]
