"""The ``kvblocks`` command.

``kvblocks info``   block sizes, formats, layouts for a model, and the hardware paths here.
``kvblocks models`` the models ``--model`` knows.
``kvblocks bench``  kvbench, the permute and the paged-cache benchmarks (needs a GPU).

Results go to stdout (``--json`` for machines), errors to stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from kvblocks import __version__
from kvblocks.errors import InvalidArgumentError, KvBlocksError
from kvblocks.layout import (
    NAMED_FORMATS,
    FullyContiguousLayout,
    InnerOrder,
    KvDims,
    LayerSeparateLayout,
    LayoutConfig,
    dtype_name,
)
from kvblocks.models import MODELS, ModelSpec, lookup_model
from kvblocks.platform import probe


def format_bytes(n: int) -> str:
    """``5242880`` -> ``"5 MiB"``; one decimal where the size is not a whole unit."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if n % scale == 0 else f"{value:.1f} {unit}"
    return f"{n} B"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def _model_from_args(args: argparse.Namespace) -> ModelSpec:
    if args.model is not None:
        return lookup_model(args.model)
    sizes = {"--layers": args.layers, "--kv-heads": args.kv_heads, "--head-dim": args.head_dim}
    missing = [flag for flag, value in sizes.items() if value is None]
    if missing:
        raise InvalidArgumentError(
            "--model",
            f"is needed, or else all of --layers, --kv-heads, --head-dim (missing {missing})",
        )
    return ModelSpec("custom", args.layers, args.kv_heads, args.head_dim, args.outer)


def _info_report(args: argparse.Namespace) -> dict:
    spec = _model_from_args(args)
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
        },
        "capabilities": [
            {"name": c.name, "available": c.available, "detail": c.detail} for c in probe()
        ],
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
    d = report["dims"]
    tp = f" on each of tp={report['tp']} ranks" if report["tp"] > 1 else ""
    print(
        f"{report['model']}{tp}: nl={d['nl']} layers, no={d['no']} outer (K and V), "
        f"nh={d['nh']} KV heads, hd={d['hd']}, dtype {d['dtype']} ({d['itemsize']} bytes)"
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
    fc, ls = lay["fully_contiguous"], lay["layer_separate"]
    print()
    print(f"Layouts of {lay['num_blocks']} blocks (nt={lay['nt']}):")
    print(f"  fully contiguous   1 allocation of {format_bytes(fc[0])}, [nb, nl, no, inner]")
    print(f"  layer separate     {len(ls)} allocations of {format_bytes(ls[0])}, [nb, no, inner]")
    print()
    print("Hardware paths here:")
    for c in report["capabilities"]:
        mark = "yes" if c["available"] else "no "
        print(f"  [{mark}] {c['name']:<24} {c['detail']}")


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


BENCH_SUITES = ("kvbench", "permute", "paged", "transfers", "disk", "pool")


def _cmd_bench(args: argparse.Namespace) -> None:
    from kvblocks.benchmarks import kvbench, paged, permute, pool, transfers
    from kvblocks.benchmarks.plot import plot_csv
    from kvblocks.benchmarks.timing import cpu_name, gpu_name, write_csv

    if args.from_csv:
        if not args.plot:
            raise InvalidArgumentError("--from-csv", "needs --plot PNG to say where to draw")
        plot_csv(args.from_csv, args.plot)
        return
    if args.suite == "pool":
        rows = pool.run(args.tokens_per_block[0])
    elif args.suite == "kvbench":
        spec = lookup_model(args.model)
        rows = kvbench.run(
            lambda nt: spec.dims(nt, args.dtype),
            args.tokens_per_block,
            args.num_blocks,
            _choices(args.patterns, kvbench.PATTERNS, "--patterns"),
            _choices(args.directions, kvbench.DIRECTIONS, "--directions"),
            _choices(args.backends, kvbench.BACKENDS, "--backends"),
            args.warmup,
            args.iters,
        )
    elif args.suite == "permute":
        rows = permute.run(
            args.layers,
            args.head_dim,
            args.tokens_per_block,
            args.kv_heads,
            args.num_blocks[0],
            args.dtype,
            args.warmup,
            args.iters,
        )
    elif args.suite == "paged":
        dims = lookup_model(args.model).dims(args.tokens_per_block[0], args.dtype)
        rows = paged.run(dims, args.pairs, args.warmup, args.iters)
    else:
        spec = lookup_model(args.model)
        run = transfers.run_manager if args.suite == "transfers" else transfers.run_disk
        extra = {"folder": args.disk_dir} if args.suite == "disk" else {}
        rows = run(
            lambda nt: spec.dims(nt, args.dtype), args.tokens_per_block, args.num_blocks, **extra
        )
    where = cpu_name() if args.suite == "pool" else gpu_name()
    print(f"# {args.suite} on {where}", file=sys.stderr)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            write_csv(rows, f)
    else:
        write_csv(rows, sys.stdout)
    if args.plot:
        if not args.csv:
            raise InvalidArgumentError("--plot", "needs --csv FILE to draw from")
        plot_csv(args.csv, args.plot, f"kvblocks {args.suite} on {gpu_name()}")


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise InvalidArgumentError(
            flag, f"must be a comma-separated subset of {allowed}, got {text!r}"
        )
    return values


def _add_bench_parser(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmarks: kvbench (default), permute, paged, transfers, disk (GPU); pool (CPU)",
        description="GPU benchmarks: CSV on stdout (or --csv), progress on stderr.",
    )
    bench.add_argument("suite", nargs="?", choices=BENCH_SUITES, default="kvbench")
    bench.add_argument("--model", default="llama-3.1-70b", help="model dims (kvbench, paged)")
    bench.add_argument("--dtype", default="bf16", help="element type (default bf16)")
    bench.add_argument(
        "--tokens-per-block",
        type=_int_list,
        metavar="N[,N...]",
        help="kvbench: 16,64; permute: 16,64,256; paged: 16",
    )
    bench.add_argument(
        "--num-blocks", type=_int_list, metavar="N[,N...]", help="kvbench: 1,128; permute: 128"
    )
    bench.add_argument("--patterns", default="fc_to_fc,lw_to_fc,fc_to_lw", help="kvbench")
    bench.add_argument("--directions", default="h2d,d2h,d2d", help="kvbench")
    bench.add_argument("--backends", default="kernel,memcpy_batch,memcpy", help="kvbench")
    bench.add_argument("--layers", type=_positive_int, default=32, help="permute: nl (default 32)")
    bench.add_argument("--head-dim", type=_positive_int, default=128, help="permute: hd")
    bench.add_argument(
        "--kv-heads", type=_int_list, default=[8, 32], metavar="N[,N...]", help="permute: nh"
    )
    bench.add_argument("--pairs", type=_positive_int, default=1024, help="paged: block mappings")
    bench.add_argument("--disk-dir", help="disk: folder for the files (default: the temp folder)")
    bench.add_argument("--warmup", type=_positive_int, default=5, help="untimed calls first")
    bench.add_argument("--iters", type=_positive_int, default=50, help="timed calls (median)")
    bench.add_argument("--csv", metavar="FILE", help="write the CSV here instead of stdout")
    bench.add_argument("--plot", metavar="PNG", help="also draw bandwidth per case (matplotlib)")
    bench.add_argument(
        "--from-csv", metavar="FILE", help="draw --plot from an earlier run's CSV; no GPU needed"
    )
    bench.set_defaults(func=_cmd_bench)


_BENCH_DEFAULTS = {
    "kvbench": {"tokens_per_block": [16, 64], "num_blocks": [1, 128]},
    "permute": {"tokens_per_block": [16, 64, 256], "num_blocks": [128]},
    "paged": {"tokens_per_block": [16], "num_blocks": [1]},
    "transfers": {"tokens_per_block": [16, 64], "num_blocks": [1, 128]},
    "disk": {"tokens_per_block": [16, 64], "num_blocks": [1, 128]},
    "pool": {"tokens_per_block": [16], "num_blocks": [1000]},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvblocks", description="KV cache blocks: layouts, kernels, tiers."
    )
    parser.add_argument("--version", action="version", version=f"kvblocks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="block sizes, formats, layouts and hardware paths")
    info.add_argument("--model", help="a known model (see `kvblocks models`)")
    info.add_argument("--layers", type=_positive_int, help="nl, when no --model is given")
    info.add_argument(
        "--kv-heads", type=_positive_int, help="total KV heads, when no --model is given"
    )
    info.add_argument("--head-dim", type=_positive_int, help="hd, when no --model is given")
    info.add_argument(
        "--outer", type=_positive_int, default=2, help="no: 2 for K and V (default), 1 for MLA"
    )
    info.add_argument(
        "--tokens-per-block",
        type=_int_list,
        default=[16, 64],
        metavar="N[,N...]",
        help="tokens per block to size (default 16,64)",
    )
    info.add_argument("--dtype", default="bf16", help="element type (default bf16)")
    info.add_argument(
        "--tp", type=_positive_int, default=1, help="tensor-parallel degree (default 1)"
    )
    info.add_argument(
        "--blocks",
        type=_positive_int,
        default=1024,
        help="blocks for the layout sizes (default 1024)",
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of tables")
    info.set_defaults(func=_cmd_info)

    models = sub.add_parser("models", help="the models --model knows")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.set_defaults(func=_cmd_models)
    _add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        for key, value in _BENCH_DEFAULTS[args.suite].items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    try:
        args.func(args)
    except KvBlocksError as exc:
        print(f"kvblocks {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`kvblocks info | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
