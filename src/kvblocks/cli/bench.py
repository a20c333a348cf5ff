"""``kvblocks bench``: the benchmarks of ``docs/performance.md``, as CSV."""

from __future__ import annotations

import argparse
import os
import sys

from kvblocks.benchmarks.plot import plot_csv
from kvblocks.cli.common import check_output, check_plot, int_list, positive_int
from kvblocks.errors import InvalidArgumentError
from kvblocks.models import lookup_model

#: Each suite, and the sizes it runs unless told.
SUITES = {
    "kvbench": {"tokens_per_block": [16, 64], "num_blocks": [1, 128]},
    "permute": {"tokens_per_block": [16, 64, 256], "num_blocks": [128]},
    "paged": {"tokens_per_block": [16], "num_blocks": [1]},
    "transfers": {"tokens_per_block": [16, 64], "num_blocks": [1, 128]},
    "disk": {"tokens_per_block": [16, 64], "num_blocks": [1, 128]},
    "remote": {"tokens_per_block": [16], "num_blocks": [1, 128]},
    "sharing": {"tokens_per_block": [16], "num_blocks": [1, 8, 64]},
    "peers": {"tokens_per_block": [16], "num_blocks": [8]},
    "pool": {"tokens_per_block": [16], "num_blocks": [1000]},
    "contention": {"tokens_per_block": [16], "num_blocks": [8, 128]},
}


def _check_bench_files(args: argparse.Namespace) -> None:
    """Every file argument of ``kvblocks bench``, checked before a benchmark runs."""
    if args.from_csv and not args.plot:
        raise InvalidArgumentError("--from-csv", "needs --plot PNG to say where to draw")
    if args.from_csv and not os.path.isfile(args.from_csv):
        raise InvalidArgumentError("--from-csv", f"names no file: {args.from_csv}")
    if args.plot and not (args.csv or args.from_csv):
        raise InvalidArgumentError("--plot", "needs --csv FILE to draw from")
    check_output("--csv", args.csv)
    check_plot(args.plot)


def _cmd_bench(args: argparse.Namespace) -> None:
    from kvblocks.benchmarks import (
        contention,
        kvbench,
        paged,
        peers,
        permute,
        pool,
        remote,
        sharing,
        transfers,
    )
    from kvblocks.benchmarks.timing import cpu_name, gpu_name, write_csv

    for key, value in SUITES[args.suite].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    _check_bench_files(args)
    if args.from_csv:
        plot_csv(args.from_csv, args.plot)
        return
    spec = None if args.suite in ("pool", "permute") else lookup_model(args.model)

    def dims_for(nt: int):
        return spec.dims(nt, args.dtype)

    if args.suite == "pool":
        rows = pool.run(args.tokens_per_block[0])
    elif args.suite == "kvbench":
        rows = kvbench.run(
            dims_for,
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
    elif args.suite == "contention":
        rows = contention.run(dims_for, args.tokens_per_block, args.num_blocks, args.iters)
    elif args.suite == "paged":
        rows = paged.run(dims_for(args.tokens_per_block[0]), args.pairs, args.warmup, args.iters)
    elif args.suite == "peers":
        rows = peers.run(
            dims_for,
            args.tokens_per_block[0],
            args.num_blocks[0],
            args.peers,
            args.warmup,
            args.iters,
        )
    elif args.suite in ("remote", "sharing"):
        run = remote.run if args.suite == "remote" else sharing.run
        rows = run(dims_for, args.tokens_per_block, args.num_blocks)
    else:
        run = transfers.run_manager if args.suite == "transfers" else transfers.run_disk
        extra = {"folder": args.disk_dir} if args.suite == "disk" else {}
        if args.suite == "transfers":
            extra = {"copy_engine": args.copy_engine, "scattered": args.scattered}
        rows = run(dims_for, args.tokens_per_block, args.num_blocks, **extra)
    on_cpu = args.suite == "pool" or (args.suite in ("sharing", "peers") and gpu_name() == "no GPU")
    where = cpu_name() if on_cpu else gpu_name()
    print(f"# {args.suite} on {where}", file=sys.stderr)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            write_csv(rows, f)
    else:
        write_csv(rows, sys.stdout)
    if args.plot:
        plot_csv(args.csv, args.plot, f"kvblocks {args.suite} on {where}")


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise InvalidArgumentError(
            flag, f"must be a comma-separated subset of {allowed}, got {text!r}"
        )
    return values


def add_parser(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmarks: kvbench (default), permute, paged, transfers, contention, disk,"
        " remote (GPU; remote also needs NIXL); sharing, peers (NIXL; a GPU where there is"
        " one); pool (CPU)",
        description="GPU benchmarks: CSV on stdout (or --csv), progress on stderr.",
    )
    bench.add_argument("suite", nargs="?", choices=tuple(SUITES), default="kvbench")
    bench.add_argument(
        "--model", default="llama-3.1-70b", help="model dims (every suite but permute and pool)"
    )
    bench.add_argument("--dtype", default="bf16", help="element type (default bf16)")
    bench.add_argument(
        "--tokens-per-block",
        type=int_list,
        metavar="N[,N...]",
        help="kvbench: 16,64; permute: 16,64,256; paged: 16",
    )
    bench.add_argument(
        "--num-blocks", type=int_list, metavar="N[,N...]", help="kvbench: 1,128; permute: 128"
    )
    bench.add_argument(
        "--copy-engine",
        action="store_true",
        help="transfers: a manager that prefers the copy engine (staged transfers)",
    )
    bench.add_argument(
        "--scattered",
        action="store_true",
        help="transfers: the pinned layout's blocks in a random order (neighbours seldom move"
        " together)",
    )
    bench.add_argument("--patterns", default="fc_to_fc,lw_to_fc,fc_to_lw", help="kvbench")
    bench.add_argument("--directions", default="h2d,d2h,d2d", help="kvbench")
    bench.add_argument("--backends", default="kernel,memcpy_batch,memcpy,staged", help="kvbench")
    bench.add_argument("--layers", type=positive_int, default=32, help="permute: nl (default 32)")
    bench.add_argument("--head-dim", type=positive_int, default=128, help="permute: hd")
    bench.add_argument(
        "--kv-heads", type=int_list, default=[8, 32], metavar="N[,N...]", help="permute: nh"
    )
    bench.add_argument("--pairs", type=positive_int, default=1024, help="paged: block mappings")
    bench.add_argument(
        "--peers", type=int_list, default=[1, 2, 4, 8], metavar="N[,N...]", help="peers: P"
    )
    bench.add_argument("--disk-dir", help="disk: folder for the files (default: the temp folder)")
    bench.add_argument("--warmup", type=positive_int, default=5, help="untimed calls first")
    bench.add_argument("--iters", type=positive_int, default=50, help="timed calls (median)")
    bench.add_argument("--csv", metavar="FILE", help="write the CSV here instead of stdout")
    bench.add_argument("--plot", metavar="PNG", help="also draw bandwidth per case (matplotlib)")
    bench.add_argument(
        "--from-csv", metavar="FILE", help="draw --plot from an earlier run's CSV; no GPU needed"
    )
    bench.set_defaults(func=_cmd_bench)
