"""Without Triton, kvblocks imports and every kernel takes the torch reference path."""

import os
import subprocess
import sys
import textwrap

import torch

from kvblocks.kernels import Backend, available, is_stub_build
from kvblocks.kernels.backend import interpreting

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None  # import triton now fails
    import torch
    import kvblocks
    from kvblocks.kernels import Backend, available, is_stub_build, universal_from_block
    from kvblocks.kernels import vectorized_copy, copy_blocks
    from kvblocks.kernels.reference import universal_from_block as ref
    from kvblocks.layout import KvDims, InnerOrder

    assert available("cpu") is Backend.REFERENCE and is_stub_build()
    dims = KvDims(nl=2, no=2, nh=2, nt=3, hd=4, dtype="bf16")
    regions = [torch.randn(3, 2, 4).to(torch.bfloat16) for _ in range(8)]
    out = torch.full((2, dims.block_elems), float("nan"), dtype=torch.bfloat16)
    universal_from_block([r.data_ptr() for r in regions], [o.data_ptr() for o in out], dims,
                         InnerOrder.NHD, device="cpu")
    want = torch.empty_like(out)
    ref(regions, want, dims, InnerOrder.NHD)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    a, b = torch.arange(100, dtype=torch.uint8), torch.zeros(100, dtype=torch.uint8)
    vectorized_copy([a.data_ptr()], [b.data_ptr()], 100, device="cpu")
    assert torch.equal(a, b)
    k = [torch.randn(4, 2)]
    copy_blocks(k, [], [[0, 3]])
    assert torch.equal(k[0][0], k[0][3])
    print("reference ok")
    """
)


def test_without_triton_everything_falls_back():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=dict(os.environ)
    )
    assert proc.returncode == 0, proc.stderr
    assert "reference ok" in proc.stdout


def test_backend_choice():
    if torch.cuda.is_available():
        assert available("cuda") is Backend.TRITON and not is_stub_build()
        assert available("cpu") is Backend.REFERENCE
    else:
        assert interpreting()
        assert available("cpu") is Backend.INTERPRETER and is_stub_build()
