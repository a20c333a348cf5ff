"""Every layout conversion, timed against a plain device copy of the same bytes.

For each ``(nt, nh)``, ``nb`` blocks exist in three places on the GPU: a layer-separate block
stack (one tensor per layer, ``[nb, no, inner]``), a fully contiguous operational layout and a
fully contiguous universal one. Each conversion between them is planned once and timed. The
ceiling is ``torch``'s copy of the same number of bytes between two of those tensors, timed
interleaved with each conversion (the GPU's clocks drift over a run; both see the same).
Bandwidth counts bytes read plus bytes written. Block 0 of every result is checked against
the torch reference after timing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvblocks.benchmarks.timing import gbps, median_ms, progress, require_gpu
from kvblocks.kernels import Operand, plan_permute
from kvblocks.kernels.reference import convert
from kvblocks.layout import (
    InnerOrder,
    KvDims,
    LayerSeparateLayout,
    LayoutConfig,
    MemoryRegion,
)

N, H = InnerOrder.NHD, InnerOrder.HND

#: (name, source operand, destination operand): the seed's six conversions, every order.
CONVERSIONS: list[tuple[str, Operand, Operand]] = [
    *(
        (f"universal_from_block/{o.name}", Operand.block_stack(o), Operand.universal())
        for o in (N, H)
    ),
    *(
        (f"block_from_universal/{o.name}", Operand.universal(), Operand.block_stack(o))
        for o in (N, H)
    ),
    *(
        (f"universal_from_operational/{o.name}", Operand.operational(o), Operand.universal())
        for o in (N, H)
    ),
    *(
        (f"operational_from_universal/{o.name}", Operand.universal(), Operand.operational(o))
        for o in (N, H)
    ),
    *(
        (
            f"operational_from_block/{a.name}->{b.name}",
            Operand.block_stack(a),
            Operand.operational(b),
        )
        for a in (N, H)
        for b in (N, H)
    ),
    *(
        (
            f"block_from_operational/{a.name}->{b.name}",
            Operand.operational(a),
            Operand.block_stack(b),
        )
        for a in (N, H)
        for b in (N, H)
    ),
]


@dataclass(frozen=True)
class PermuteRow:
    conversion: str
    nl: int
    nh: int
    nt: int
    hd: int
    nb: int
    bytes_moved: int
    median_ms: float
    bandwidth_gbps: float
    copy_gbps: float
    ratio: float


class _Places:
    """``nb`` blocks as a block stack, as operational blocks and as universal blocks."""

    def __init__(self, dims: KvDims, nb: int) -> None:
        config = LayoutConfig.from_dims(dims, nb)
        per_layer = LayerSeparateLayout.required_allocations(config)[0] // dims.itemsize
        make = lambda n: torch.empty(n, dtype=dims.dtype, device="cuda").normal_()  # noqa: E731
        self.stack_tensors = [make(per_layer) for _ in range(dims.nl)]
        self.operational = make(nb * dims.block_elems)
        self.universal = make(nb * dims.block_elems)
        self.stack = LayerSeparateLayout(config, [MemoryRegion.of(t) for t in self.stack_tensors])
        self.dims, self.nb = dims, nb

    def table(self, operand: Operand) -> list[int]:
        ids = range(self.nb)
        if operand.stack:
            return self.stack.region_table(ids)
        t = self.universal if operand.format.is_universal() else self.operational
        return [t.data_ptr() + b * self.dims.block_bytes for b in ids]

    def block0(self, operand: Operand) -> list[torch.Tensor]:
        """Block 0 as the reference takes it (its regions, or the whole block)."""
        d = self.dims
        if operand.stack:
            return [
                self.stack_tensors[layer].view(self.nb, d.no, d.inner)[0, o]
                for layer in range(d.nl)
                for o in range(d.no)
            ]
        t = self.universal if operand.format.is_universal() else self.operational
        return [t[: d.block_elems]]


def run(
    nl: int,
    hd: int,
    nt_values: list[int],
    nh_values: list[int],
    nb: int = 128,
    dtype: torch.dtype | str = "bf16",
    warmup: int = 5,
    iters: int = 50,
) -> list[PermuteRow]:
    device = require_gpu()
    total = len(nt_values) * len(nh_values) * len(CONVERSIONS)
    rows, step = [], 0
    for nt in nt_values:
        for nh in nh_values:
            dims = KvDims(nl=nl, no=2, nh=nh, nt=nt, hd=hd, dtype=dtype)
            places = _Places(dims, nb)
            moved = 2 * nb * dims.block_bytes

            def plain_copy(p=places):
                p.universal.copy_(p.operational)

            for name, src, dst in CONVERSIONS:
                step += 1
                progress(step, total, f"nt={nt} nh={nh} {name}")
                plan = plan_permute(places.table(src), src, places.table(dst), dst, dims, device)
                ms, copy_ms = median_ms(plan.run, plain_copy, warmup=warmup, iters=iters)
                plan.run()  # the interleaved copy overwrote one of the operands
                _check_block0(places, src, dst)
                bw, copy_bw = gbps(moved, ms), gbps(moved, copy_ms)
                rows.append(
                    PermuteRow(
                        name,
                        nl,
                        nh,
                        nt,
                        hd,
                        nb,
                        moved,
                        round(ms, 4),
                        round(bw, 1),
                        round(copy_bw, 1),
                        round(bw / copy_bw, 3),
                    )
                )
            del places
            torch.cuda.empty_cache()
    return rows


def _check_block0(places: _Places, src: Operand, dst: Operand) -> None:
    got = [t.clone() for t in places.block0(dst)]
    want = [torch.empty_like(t) for t in got]
    convert(
        places.block0(src),
        want,
        places.dims,
        src.format,
        dst.format,
        src_is_stack=src.stack,
        dst_is_stack=dst.stack,
    )
    for g, w in zip(got, want, strict=True):
        if not torch.equal(g.view(torch.uint8), w.view(torch.uint8)):
            raise AssertionError("the permute's block 0 differs from the reference")
