"""What this machine offers for moving KV blocks: GPU, pinned memory, Triton, batch copies, NIXL,
and sharing blocks with other workers.

Probing never fails: a missing piece is reported as unavailable with the reason.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass

import torch

from kvblocks.kernels import Backend, available, has_memcpy_batch_async
from kvblocks.remote import installed_package
from kvblocks.storage.numa import gpu_node, online_nodes


@dataclass(frozen=True)
class Capability:
    """One hardware or software path and whether it can be used here."""

    name: str
    available: bool
    detail: str


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_capability() -> Capability:
    if not torch.cuda.is_available():
        return Capability("CUDA GPU", False, f"torch {torch.__version__} sees no CUDA device")
    count = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    gib = props.total_memory / 2**30
    return Capability(
        "CUDA GPU",
        True,
        f"{count} x {props.name}, {gib:.0f} GiB, {props.multi_processor_count} SMs"
        f" (torch {torch.__version__}, CUDA {torch.version.cuda})",
    )


def _triton_capability() -> Capability:
    version = _package_version("triton")
    if version is None:
        return Capability("Triton kernels", False, "triton is not installed (extra: gpu)")
    backend = available()
    if backend is Backend.TRITON:
        return Capability("Triton kernels", True, f"triton {version}, compiled for the GPU")
    return Capability(
        "Triton kernels",
        False,
        f"triton {version}; no GPU: kernels run as {backend.value} on the CPU",
    )


def _memcpy_batch_capability(gpu: bool) -> Capability:
    version = _package_version("cuda-bindings")
    if version is None:
        return Capability(
            "cudaMemcpyBatchAsync", False, "cuda-bindings is not installed (extra: gpu)"
        )
    if not gpu:
        return Capability("cudaMemcpyBatchAsync", False, f"cuda-bindings {version}; no GPU")
    if not has_memcpy_batch_async():
        return Capability(
            "cudaMemcpyBatchAsync", False, "needs CUDA 12.8+; one cudaMemcpyAsync per pair instead"
        )
    return Capability("cudaMemcpyBatchAsync", True, f"cuda-bindings {version}")


def _sharing_capability(nixl: str | None) -> Capability:
    needs = [] if nixl else ["nixl (extra: remote)"]
    needs += [
        f"{package} (extra: events)"
        for module, package in (("zmq", "pyzmq"), ("msgpack", "msgpack"))
        if importlib.util.find_spec(module) is None
    ]
    if needs:
        return Capability("block sharing (G4)", False, "needs " + ", ".join(needs))
    return Capability(
        "block sharing (G4)", True, "BlockManager.serve / add_peer: peers' G2 through NIXL"
    )


def _numa_capability(gpu: bool) -> Capability:
    name = "NUMA placement of G2"
    nodes = online_nodes()
    if len(nodes) < 2:
        why = "one NUMA node" if nodes else "the system does not list NUMA nodes"
        return Capability(name, False, f"{why}: nothing to place")
    listed = ", ".join(map(str, nodes))
    if not gpu:
        return Capability(name, True, f"nodes {listed}; host_numa_node picks one")
    gpus = [gpu_node(d) for d in range(torch.cuda.device_count())]
    if all(node is None for node in gpus):
        return Capability(
            name, True, f"nodes {listed}; the system does not say the GPUs': name one"
        )
    where = ", ".join(f"GPU {d}: {'?' if n is None else n}" for d, n in enumerate(gpus))
    return Capability(name, True, f"nodes {listed}; {where}")


def probe() -> list[Capability]:
    """Report every path kvblocks can use to hold and move blocks on this machine."""
    cuda = _cuda_capability()
    gpu = cuda.available
    nixl = installed_package()
    return [
        cuda,
        Capability(
            "pinned host memory",
            gpu,
            "page-locked, read by kernels directly" if gpu else "needs a CUDA device",
        ),
        _triton_capability(),
        _memcpy_batch_capability(gpu),
        Capability("torch reference path", True, "always available; used where kernels cannot run"),
        Capability(
            "O_DIRECT disk I/O",
            hasattr(os, "O_DIRECT"),
            "bypasses the page cache where the filesystem allows",
        ),
        Capability(
            "NIXL remote transfers",
            nixl is not None,
            f"{nixl} installed" if nixl else "nixl is not installed (extra: remote)",
        ),
        _sharing_capability(nixl),
        _numa_capability(gpu),
    ]
