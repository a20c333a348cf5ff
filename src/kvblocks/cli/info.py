"""``kvblocks info`` (the hardware paths here; with a model, its block sizes, formats and
layouts) and ``kvblocks models`` (the models ``--model`` knows)."""

from __future__ import annotations

import argparse
import json
import sys

from kvblocks.cli.common import int_list, model_from_args, positive_int
from kvblocks.layout import (
    NAMED_FORMATS,
    FullyContiguousLayout,
    InnerOrder,
    KvDims,
    LayerSeparateLayout,
    LayoutConfig,
    OuterSeparateLayout,
    dtype_name,
)
from kvblocks.models import MODELS
from kvblocks.platform import probe


def format_bytes(n: int) -> str:
    """``5242880`` -> ``"5 MiB"``; one decimal where the size is not a whole unit."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if n % scale == 0 else f"{value:.1f} {unit}"
    return f"{n} B"


def _capabilities() -> list[dict]:
    return [{"name": c.name, "available": c.available, "detail": c.detail} for c in probe()]


def _names_a_model(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.model, args.layers, args.kv_heads, args.head_dim))


def _info_report(args: argparse.Namespace) -> dict:
    """What ``kvblocks info`` prints: the hardware paths, and the model's sizes if it names one."""
    if not _names_a_model(args):
        return {"capabilities": _capabilities()}
    spec = model_from_args(args)
    all_dims = [spec.dims(nt, args.dtype, args.tp) for nt in args.tokens_per_block]
    first = all_dims[0]
    config = LayoutConfig.from_dims(first, args.blocks)
    return {
        "model": spec.name,
        "tp": args.tp,
        "dims": {
            "nl": first.nl,
            "no": first.no,
            "nh": first.nh,
            "hd": first.hd,
            "dtype": dtype_name(first.dtype),
            "itemsize": first.itemsize,
        },
        "sizes": [
            {
                "nt": d.nt,
                "region_bytes": d.region_bytes,
                "block_bytes": d.block_bytes,
                "token_bytes": d.token_bytes,
            }
            for d in all_dims
        ],
        "formats": _formats(first),
        "layouts": {
            "nt": first.nt,
            "num_blocks": args.blocks,
            "fully_contiguous": FullyContiguousLayout.required_allocations(config),
            "layer_separate": LayerSeparateLayout.required_allocations(config),
            "outer_separate": OuterSeparateLayout.required_allocations(config),
        },
        "capabilities": _capabilities(),
    }


def _formats(dims: KvDims) -> list[dict]:
    rows = [
        {
            "name": f"block_stack_{order.name.lower()}",
            "shape": [dims.nl * dims.no, *dims.region_shape(order)],
            "note": f"{dims.nl * dims.no} separate regions of {list(dims.region_shape(order))}",
        }
        for order in InnerOrder
    ]
    rows += [
        {
            "name": fmt.name,
            "shape": list(dims.block_shape(fmt)),
            "note": "[" + ", ".join([*(str(d) for d in fmt.dim_order), "hd"]) + "]",
        }
        for fmt in NAMED_FORMATS
        if fmt.dim_order is not None
    ]
    return rows


def _print_info(report: dict) -> None:
    if "dims" in report:
        _print_model(report)
        print()
    print("Hardware paths here:")
    for c in report["capabilities"]:
        mark = "yes" if c["available"] else "no "
        print(f"  [{mark}] {c['name']:<24} {c['detail']}")


def _print_model(report: dict) -> None:
    d = report["dims"]
    tp = f" on each of tp={report['tp']} ranks" if report["tp"] > 1 else ""
    outer = "K and V" if d["no"] == 2 else "a latent" if d["no"] == 1 else "chunks"
    byte_s = "byte" if d["itemsize"] == 1 else "bytes"
    print(
        f"{report['model']}{tp}: nl={d['nl']} layers, no={d['no']} outer ({outer}), "
        f"nh={d['nh']} KV heads, hd={d['hd']}, dtype {d['dtype']} ({d['itemsize']} {byte_s})"
    )
    print()
    print(f"{'tokens/block':>12}  {'region':>10}  {'block':>10}  {'per token':>10}")
    for s in report["sizes"]:
        print(
            f"{s['nt']:>12}  {format_bytes(s['region_bytes']):>10}  "
            f"{format_bytes(s['block_bytes']):>10}  {format_bytes(s['token_bytes']):>10}"
        )
    lay = report["layouts"]
    print()
    print(f"Block formats (nt={lay['nt']}):")
    for f in report["formats"]:
        print(f"  {f['name']:<20} {str(f['shape']):<24} {f['note']}")
    fc, ls, os_ = lay["fully_contiguous"], lay["layer_separate"], lay["outer_separate"]
    print()
    print(f"Layouts of {lay['num_blocks']} blocks (nt={lay['nt']}):")
    print(f"  fully contiguous   1 allocation of {format_bytes(fc[0])}, [nb, nl, no, inner]")
    print(f"  layer separate     {len(ls)} allocations of {format_bytes(ls[0])}, [nb, no, inner]")
    print(f"  outer separate     {len(os_)} allocations of {format_bytes(os_[0])}, [nb, inner]")


def _cmd_info(args: argparse.Namespace) -> None:
    report = _info_report(args)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        _print_info(report)


def _cmd_models(args: argparse.Namespace) -> None:
    rows = [
        {
            "name": m.name,
            "nl": m.num_layers,
            "nh": m.num_kv_heads,
            "hd": m.head_dim,
            "no": m.outer_dim,
        }
        for m in MODELS.values()
    ]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return
    print(f"{'model':<16} {'nl':>4} {'nh':>4} {'hd':>4} {'no':>3}")
    for r in rows:
        print(f"{r['name']:<16} {r['nl']:>4} {r['nh']:>4} {r['hd']:>4} {r['no']:>3}")


def add_parsers(sub) -> None:
    info = sub.add_parser(
        "info",
        help="hardware paths; with a model, block sizes, formats and layouts",
        description="The hardware paths kvblocks can use here; given a model (--model, or"
        " --layers, --kv-heads and --head-dim), also its block sizes, formats and layouts.",
    )
    info.add_argument("--model", help="a known model (see `kvblocks models`)")
    info.add_argument("--layers", type=positive_int, help="nl, when no --model is given")
    info.add_argument(
        "--kv-heads", type=positive_int, help="total KV heads, when no --model is given"
    )
    info.add_argument("--head-dim", type=positive_int, help="hd, when no --model is given")
    info.add_argument(
        "--outer", type=positive_int, default=2, help="no: 2 for K and V (default), 1 for MLA"
    )
    info.add_argument(
        "--tokens-per-block",
        type=int_list,
        default=[16, 64],
        metavar="N[,N...]",
        help="tokens per block to size (default 16,64)",
    )
    info.add_argument("--dtype", default="bf16", help="element type (default bf16)")
    info.add_argument(
        "--tp", type=positive_int, default=1, help="tensor-parallel degree (default 1)"
    )
    info.add_argument(
        "--blocks",
        type=positive_int,
        default=1024,
        help="blocks for the layout sizes (default 1024)",
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of tables")
    info.set_defaults(func=_cmd_info)

    models = sub.add_parser("models", help="the models --model knows")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.set_defaults(func=_cmd_models)
