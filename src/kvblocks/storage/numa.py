"""NUMA placement of host memory: the node a GPU hangs off, and host memory placed there.

On a host with more than one NUMA node (a server with two CPU sockets, say) each GPU sits
behind one socket's PCIe root. Pinned memory on the other socket's node reaches the GPU across
the link between the sockets, which is slower than PCIe and shared with everything else that
crosses it; memory on the GPU's own node takes the short path. The pages of an allocation land
where the kernel's memory policy puts them when they are first touched, which by default is
the node of the CPU that touches them: wherever the allocating thread ran.

:func:`allocate_on_node` maps anonymous memory, gives its range a preferred node (``mbind``
with ``MPOL_PREFERRED``: pages go to that node while it has free memory, elsewhere after) and,
for pinned memory, registers it with CUDA, which touches every page. :func:`gpu_node` reads the
GPU's node from sysfs; :func:`nodes_of` says where the pages of a tensor are (``move_pages``).

Linux only (x86-64 and AArch64); elsewhere :func:`online_nodes` is empty and nothing is placed.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import weakref
from collections import Counter
from pathlib import Path

import torch

from kvblocks.errors import InvalidArgumentError, StorageError

#: Where Linux lists the NUMA nodes.
NODES_DIR = Path("/sys/devices/system/node")
#: Where Linux lists PCI devices, each with a ``numa_node`` file.
PCI_DIR = Path("/sys/bus/pci/devices")
#: Pages of an allocation :func:`nodes_of` looks at, at most (spread evenly).
SAMPLE_PAGES = 1024

_PAGE = os.sysconf("SC_PAGE_SIZE")
#: ``mbind`` and ``move_pages`` system call numbers per machine.
_SYSCALLS = {"x86_64": (237, 279), "aarch64": (235, 239)}
_MPOL_PREFERRED = 1
_PROT_READ_WRITE = 0x1 | 0x2
_MAP_PRIVATE_ANONYMOUS = 0x02 | 0x20
#: ``cudaHostRegisterPortable | cudaHostRegisterMapped``: pinned for every context, and
#: addressable from the GPU (kernels read and write pinned memory directly).
_REGISTER_FLAGS = 0x1 | 0x2


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.syscall.restype = ctypes.c_long
    return libc


def online_nodes() -> list[int]:
    """The NUMA nodes online here, ascending (``[0]`` on most single-socket machines; empty
    where the system does not say, or placement is not supported)."""
    if _SYSCALLS.get(platform.machine()) is None:
        return []
    try:
        text = (NODES_DIR / "online").read_text().strip()
    except OSError:
        return []
    return parse_node_list(text)


def parse_node_list(text: str) -> list[int]:
    """The nodes of a Linux list such as ``"0-1,4"`` (``[0, 1, 4]``).

    Raises:
        InvalidArgumentError: ``text`` is not such a list.
    """
    nodes: set[int] = set()
    for part in filter(None, text.strip().split(",")):
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise InvalidArgumentError("text", f"is not a node list, got {text!r}") from None
        if low < 0 or high < low:
            raise InvalidArgumentError("text", f"is not a node list, got {text!r}")
        nodes.update(range(low, high + 1))
    return sorted(nodes)


def gpu_node(device_id: int) -> int | None:
    """The NUMA node of CUDA device ``device_id``, from its PCI device's ``numa_node`` in
    sysfs; None without a GPU, where the system does not say (``-1``, as in many virtual
    machines) or with one node only (placement then changes nothing)."""
    if not torch.cuda.is_available() or len(online_nodes()) < 2:
        return None
    props = torch.cuda.get_device_properties(device_id)
    bus = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    try:
        node = int((PCI_DIR / bus / "numa_node").read_text())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def check_node(node: int, argument: str = "numa_node") -> int:
    """``node`` if it is an online NUMA node here.

    Raises:
        InvalidArgumentError: it is not (the message names ``argument`` and the online nodes).
    """
    nodes = online_nodes()
    if isinstance(node, bool) or not isinstance(node, int) or node not in nodes:
        known = ", ".join(map(str, nodes)) or "none: this system does not support placement"
        raise InvalidArgumentError(argument, f"must be an online NUMA node ({known}), got {node!r}")
    return node


def allocate_on_node(size: int, node: int, pin: bool) -> torch.Tensor:
    """``size`` bytes of host memory, page aligned, whose pages go to NUMA node ``node`` while
    it has free memory; with ``pin``, page-locked and registered with CUDA (which places every
    page now), else placed as they are first written.

    Returns a ``uint8`` tensor over the memory; the memory is unregistered and unmapped once
    no tensor over it is left.

    Raises:
        InvalidArgumentError: ``node`` is not an online node.
        StorageError: the memory cannot be mapped, placed or registered.
    """
    check_node(node)
    libc = _libc()
    length = -(-size // _PAGE) * _PAGE
    addr = libc.mmap(None, length, _PROT_READ_WRITE, _MAP_PRIVATE_ANONYMOUS, -1, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise StorageError(f"cannot map {length} bytes: {os.strerror(ctypes.get_errno())}")
    try:
        _prefer(libc, addr, length, node)
        if pin:
            error = torch.cuda.cudart().cudaHostRegister(addr, length, _REGISTER_FLAGS)
            if int(error) != 0:
                raise StorageError(f"cannot pin {length} bytes on NUMA node {node}: {error}")
    except BaseException:
        libc.munmap(addr, length)
        raise
    owner = (ctypes.c_ubyte * length).from_address(addr)
    weakref.finalize(owner, _unmap, addr, length, pin)
    return torch.frombuffer(owner, dtype=torch.uint8)[:size]


def nodes_of(tensor: torch.Tensor, samples: int = SAMPLE_PAGES) -> Counter[int]:
    """How many of up to ``samples`` pages of CPU ``tensor`` (spread evenly) sit on each NUMA
    node; pages not yet touched are left out. Empty where placement is not supported.

    Raises:
        InvalidArgumentError: ``tensor`` is not a CPU tensor.
    """
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
        raise InvalidArgumentError("tensor", f"must be a CPU tensor, got {tensor!r}")
    calls = _SYSCALLS.get(platform.machine())
    nbytes = tensor.numel() * tensor.element_size()
    if calls is None or nbytes == 0:
        return Counter()
    first = tensor.data_ptr() // _PAGE * _PAGE
    pages = (tensor.data_ptr() + nbytes - 1 - first) // _PAGE + 1
    step = -(-pages // max(1, samples))
    addrs = [first + i * _PAGE for i in range(0, pages, step)]
    count = len(addrs)
    table = (ctypes.c_void_p * count)(*addrs)
    status = (ctypes.c_int * count)()
    libc = _libc()
    done = libc.syscall(
        ctypes.c_long(calls[1]),
        ctypes.c_int(0),
        ctypes.c_ulong(count),
        table,
        None,
        status,
        ctypes.c_int(0),
    )
    if done != 0:
        raise StorageError(f"cannot ask where pages are: {os.strerror(ctypes.get_errno())}")
    return Counter(node for node in status if node >= 0)


def _prefer(libc: ctypes.CDLL, addr: int, length: int, node: int) -> None:
    """Give the pages of ``[addr, addr + length)`` the preferred node ``node``."""
    bits = 8 * ctypes.sizeof(ctypes.c_ulong)
    mask = (ctypes.c_ulong * (node // bits + 1))()
    mask[node // bits] = 1 << (node % bits)
    done = libc.syscall(
        ctypes.c_long(_SYSCALLS[platform.machine()][0]),
        ctypes.c_void_p(addr),
        ctypes.c_ulong(length),
        ctypes.c_int(_MPOL_PREFERRED),
        mask,
        ctypes.c_ulong(len(mask) * bits + 1),
        ctypes.c_uint(0),
    )
    if done != 0:
        reason = os.strerror(ctypes.get_errno())
        raise StorageError(f"cannot place {length} bytes on NUMA node {node}: {reason}")


def _unmap(addr: int, length: int, pinned: bool) -> None:
    if pinned:
        torch.cuda.cudart().cudaHostUnregister(addr)
    _libc().munmap(addr, length)
