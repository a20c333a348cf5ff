"""Address tables: conversion to host int64 tensors, the checks run before any launch, the
strided form kernels read, and tensors over raw addresses for the reference path.

A table is anything holding int addresses: ``array('q')`` (what layouts build), a list of ints,
or an integer torch tensor (a CUDA tensor is copied to the host once, to be checked). Kernels
read tables as :class:`StridedTable` s, which a layout's blocks give without building the flat
table: only the block ids change from one transfer to the next.
"""

from __future__ import annotations

import ctypes
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvblocks.errors import InvalidArgumentError, LengthMismatchError, OverlapError
from kvblocks.kernels._triton import tl, triton

AddressTable = Sequence[int] | array | torch.Tensor

_INT_DTYPES = (torch.int64, torch.int32, torch.uint64)


@dataclass(frozen=True)
class StridedTable:
    """An address table in factored form, expanded by the kernel that reads it.

    Entry ``e`` is ``bases[e % per_block] + ids[e // per_block] * stride``, for
    ``0 <= e < len(ids) * per_block``.

    Attributes:
        ids: ``[n]`` int64 block ids (or any multipliers of ``stride``).
        bases: ``[per_block]`` int64 addresses of one block's chunks when its id is 0.
        stride: bytes from one block id to the next.

    A flat table is ``StridedTable.flat(table)``: ``ids = table``, ``bases = [0]``,
    ``stride = 1``. Both tensors live where the kernel runs.
    """

    ids: torch.Tensor
    bases: torch.Tensor
    stride: int

    @classmethod
    def flat(cls, table: torch.Tensor) -> StridedTable:
        return cls(table, table.new_zeros(1), 1)

    @property
    def per_block(self) -> int:
        return self.bases.numel()

    def __len__(self) -> int:
        return self.ids.numel() * self.per_block

    def expand(self) -> torch.Tensor:
        """The flat table: ``[len(self)]`` int64, block-major, on the tables' device."""
        return (self.ids[:, None] * self.stride + self.bases[None, :]).reshape(-1)

    def entries(self) -> list[int]:
        """The flat table as Python ints, block-major (both tensors on the CPU): what
        :meth:`expand` holds, built without a torch op (see :func:`host_ids`)."""
        bases, stride = self.bases.tolist(), self.stride
        return [i * stride + b for i in self.ids.tolist() for b in bases]

    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """What kernels take for one table: ``ids, bases, stride, per_block``."""
        return self.ids, self.bases, self.stride, self.per_block


@triton.jit
def table_entry(ids, bases, stride, per_block, e):
    """Entry ``e`` (int64) of a :class:`StridedTable` passed as its :meth:`kernel_args`."""
    return tl.load(bases + e % per_block) + tl.load(ids + e // per_block) * stride


def host_table(
    value: AddressTable, argument: str, length: int | None = None, addresses: bool = True
) -> torch.Tensor:
    """``value`` as a 1-d contiguous int64 CPU tensor (of non-zero entries, for ``addresses``).

    Raises:
        InvalidArgumentError: not a table of ints, or a null address.
        LengthMismatchError: ``length`` is given and differs.
    """
    if isinstance(value, torch.Tensor):
        if value.dtype not in _INT_DTYPES or value.dim() != 1:
            raise InvalidArgumentError(
                argument,
                f"must be a 1-d int64 tensor, got {value.dtype} of shape {list(value.shape)}",
            )
        table = value.detach().to("cpu", torch.int64).contiguous()
    elif isinstance(value, array) and value.typecode in "qQ" and len(value):
        table = torch.frombuffer(value, dtype=torch.int64)
    else:
        try:
            table = torch.tensor(list(value), dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise InvalidArgumentError(argument, f"must hold ints: {exc}") from None
        if table.dim() != 1:
            raise InvalidArgumentError(argument, "must be a flat table of addresses")
    if length is not None and table.numel() != length:
        raise LengthMismatchError(argument, f"must hold {length} addresses, got {table.numel()}")
    if addresses and table.numel() and bool((table == 0).any()):
        raise InvalidArgumentError(argument, f"holds a null address at index {_first(table == 0)}")
    return table


def host_ids(values: Sequence[int]) -> torch.Tensor:
    """``values`` as a 1-d int64 CPU tensor, built without a torch op.

    On a transfer's path, where the host's work should keep the GIL: a torch op lets it go,
    and beside a Python thread that never blocks, winning it back takes up to a switch
    interval (5 ms by default).

    Raises:
        TypeError, OverflowError: a value that is not an int64.
    """
    table = array("q", values)
    if not table:
        return torch.tensor([], dtype=torch.int64)
    return torch.frombuffer(table, dtype=torch.int64)


def _first(mask: torch.Tensor) -> int:
    return int(mask.nonzero()[0, 0])


def check_alignment(table: torch.Tensor, align: int, argument: str, why: str) -> None:
    """Raise naming the first entry of ``table`` that is not a multiple of ``align`` bytes."""
    bad = table % align != 0
    if bool(bad.any()):
        i = _first(bad)
        raise InvalidArgumentError(
            f"{argument}[{i}]", f"= {int(table[i]):#x} is not aligned to {align} bytes ({why})"
        )


def common_alignment(*values: torch.Tensor | int, limit: int = 16) -> int:
    """The largest power of two up to ``limit`` that divides every address and size given."""
    align = limit
    while align > 1 and not all(_divisible(v, align) for v in values):
        align //= 2
    return align


def _divisible(value: torch.Tensor | int, align: int) -> bool:
    if isinstance(value, int):
        return value % align == 0
    return bool((value % align == 0).all())


def check_disjoint(
    src: torch.Tensor,
    src_size: int | torch.Tensor,
    dst: torch.Tensor,
    dst_size: int | torch.Tensor,
    src_arg: str,
    dst_arg: str,
) -> None:
    """Raise if two destination spans overlap, or a destination overlaps a source span.

    Spans are ``[addr, addr + size)``; a size is one int for the whole table or one per entry.
    Sources may overlap each other (reading twice is fine).
    """
    dst_ends = dst + dst_size
    order = torch.argsort(dst)
    starts, ends = dst[order], dst_ends[order]
    if starts.numel() > 1:
        # Sorted by start, some pair overlaps exactly when some neighbouring pair does.
        clash = starts[1:] < ends[:-1]
        if bool(clash.any()):
            k = _first(clash)
            i, j = sorted((int(order[k]), int(order[k + 1])))
            raise OverlapError(dst_arg, f"entries {i} and {j} overlap: both would be written")
    if src.numel() == 0 or starts.numel() == 0:
        return
    src_order = torch.argsort(src)
    src_starts = src[src_order]
    src_reach = (src + src_size)[src_order].cummax(dim=0).values
    # Sources starting before a destination's end overlap it iff the furthest of them ends
    # after the destination's start.
    before_end = torch.searchsorted(src_starts, ends, side="left")
    reach = src_reach[(before_end - 1).clamp(min=0)]
    clash = (before_end > 0) & (reach > starts)
    if bool(clash.any()):
        k = _first(clash)
        raise OverlapError(
            dst_arg, f"entry {int(order[k])} overlaps a span of {src_arg}: copy out of place"
        )


def tensor_at(addr: int, nbytes: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor over ``nbytes`` of existing memory at ``addr`` (no copy), viewed as ``dtype``.

    For the reference path only: the memory must stay alive and be reachable from ``device``.
    """
    if device.type == "cpu":
        buf = (ctypes.c_char * nbytes).from_address(addr)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype)
    holder = _CudaSpan(addr, nbytes)
    return torch.as_tensor(holder, device=device).view(dtype)


class _CudaSpan:
    """Exposes device memory to ``torch.as_tensor`` through the CUDA array interface."""

    def __init__(self, addr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (addr, False),
            "version": 3,
        }
