"""The ``kvblocks`` command.

``kvblocks info``   the hardware paths here; with a model, its block sizes, formats and layouts.
``kvblocks models`` the models ``--model`` knows.
``kvblocks bench``  kvbench, the permute and the paged-cache benchmarks (needs a GPU).
``kvblocks demo``   a multi-turn chat workload through a BlockManager with G1, G2 and G3.
``kvblocks serve``  a cache of blocks for other workers (their tier G4), until stopped.
``kvblocks events`` workers' KV events as JSON lines, and what each worker holds.

Results go to stdout (``--json`` for machines), errors to stderr with exit status 2; file
arguments are checked before any long work. Ctrl-C ends a command with status 130 (``serve`` and
``events``: Ctrl-C or SIGTERM stops them cleanly, with status 0).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence

from kvblocks import __version__
from kvblocks.benchmarks.plot import plot_csv, require_matplotlib
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


def _int_at_least(minimum: int, what: str):
    """An argparse type: an int >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive int")
_non_negative_int = _int_at_least(0, "an int >= 0")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``:PORT`` for every interface) as ``(host, port)``."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "0.0.0.0", int(port)


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


def _capabilities() -> list[dict]:
    return [{"name": c.name, "available": c.available, "detail": c.detail} for c in probe()]


def _names_a_model(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.model, args.layers, args.kv_heads, args.head_dim))


def _info_report(args: argparse.Namespace) -> dict:
    """What ``kvblocks info`` prints: the hardware paths, and the model's sizes if it names one."""
    if not _names_a_model(args):
        return {"capabilities": _capabilities()}
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


BENCH_SUITES = (
    "kvbench",
    "permute",
    "paged",
    "transfers",
    "disk",
    "remote",
    "sharing",
    "peers",
    "pool",
)


def _check_output(flag: str, path: str | None) -> None:
    """Fail before any long work if ``path`` (given with ``flag``) cannot be a file we write."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InvalidArgumentError(flag, f"is in a folder that does not exist: {folder}")
    if os.path.isdir(path):
        raise InvalidArgumentError(flag, f"names a folder, not a file: {path}")


def _check_plot(path: str | None) -> None:
    """``--plot PNG``: a file we can write, and matplotlib to draw it."""
    if path is not None:
        _check_output("--plot", path)
        require_matplotlib()


def _check_bench_files(args: argparse.Namespace) -> None:
    """Every file argument of ``kvblocks bench``, checked before a benchmark runs."""
    if args.from_csv and not args.plot:
        raise InvalidArgumentError("--from-csv", "needs --plot PNG to say where to draw")
    if args.from_csv and not os.path.isfile(args.from_csv):
        raise InvalidArgumentError("--from-csv", f"names no file: {args.from_csv}")
    if args.plot and not (args.csv or args.from_csv):
        raise InvalidArgumentError("--plot", "needs --csv FILE to draw from")
    _check_output("--csv", args.csv)
    _check_plot(args.plot)


def _cmd_bench(args: argparse.Namespace) -> None:
    from kvblocks.benchmarks import (
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

    _check_bench_files(args)
    if args.from_csv:
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
    elif args.suite == "peers":
        spec = lookup_model(args.model)
        rows = peers.run(
            lambda nt: spec.dims(nt, args.dtype),
            args.tokens_per_block[0],
            args.num_blocks[0],
            args.peers,
            args.warmup,
            args.iters,
        )
    elif args.suite in ("remote", "sharing"):
        spec = lookup_model(args.model)
        run = remote.run if args.suite == "remote" else sharing.run
        rows = run(lambda nt: spec.dims(nt, args.dtype), args.tokens_per_block, args.num_blocks)
    else:
        spec = lookup_model(args.model)
        run = transfers.run_manager if args.suite == "transfers" else transfers.run_disk
        extra = {"folder": args.disk_dir} if args.suite == "disk" else {}
        if args.suite == "transfers":
            extra = {"copy_engine": args.copy_engine}
        rows = run(
            lambda nt: spec.dims(nt, args.dtype), args.tokens_per_block, args.num_blocks, **extra
        )
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


def _add_bench_parser(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmarks: kvbench (default), permute, paged, transfers, disk, remote (GPU;"
        " remote also needs NIXL); sharing, peers (NIXL; a GPU where there is one); pool (CPU)",
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
    bench.add_argument(
        "--copy-engine",
        action="store_true",
        help="transfers: a manager that prefers the copy engine (staged transfers)",
    )
    bench.add_argument("--patterns", default="fc_to_fc,lw_to_fc,fc_to_lw", help="kvbench")
    bench.add_argument("--directions", default="h2d,d2h,d2d", help="kvbench")
    bench.add_argument("--backends", default="kernel,memcpy_batch,memcpy,staged", help="kvbench")
    bench.add_argument("--layers", type=_positive_int, default=32, help="permute: nl (default 32)")
    bench.add_argument("--head-dim", type=_positive_int, default=128, help="permute: hd")
    bench.add_argument(
        "--kv-heads", type=_int_list, default=[8, 32], metavar="N[,N...]", help="permute: nh"
    )
    bench.add_argument("--pairs", type=_positive_int, default=1024, help="paged: block mappings")
    bench.add_argument(
        "--peers", type=_int_list, default=[1, 2, 4, 8], metavar="N[,N...]", help="peers: P"
    )
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
    "remote": {"tokens_per_block": [16], "num_blocks": [1, 128]},
    "sharing": {"tokens_per_block": [16], "num_blocks": [1, 8, 64]},
    "peers": {"tokens_per_block": [16], "num_blocks": [8]},
    "pool": {"tokens_per_block": [16], "num_blocks": [1000]},
}


def _cmd_demo(args: argparse.Namespace) -> None:
    import tempfile

    from kvblocks.demo import ChatWorkload, PrefixRouter, plot_demo, progress_bar, run_demo
    from kvblocks.pool import BlockManager, BlockManagerConfig, FrequencyFilter, KvIndex, Tier

    _check_plot(args.plot)
    if args.model is None and args.layers is None:
        args.model = "llama-3.2-1b"
    spec = _model_from_args(args)
    workload = ChatWorkload(
        conversations=args.conversations,
        turns=args.turns,
        system_prompts=args.system_prompts,
        system_tokens=args.system_tokens,
        seed=args.seed,
    )
    size = args.tokens_per_block
    longest = -(-workload.max_tokens() // size)
    stored = workload.conversations * longest
    g1 = args.g1_blocks or max(2 * longest, stored // 8)
    g2 = stored // 3 if args.g2_blocks is None else args.g2_blocks
    g3 = (stored + stored // 4) if args.g3_blocks is None else args.g3_blocks
    if g1 < longest:
        raise InvalidArgumentError(
            "--g1-blocks", f"must hold one conversation ({longest} blocks), got {g1}"
        )
    if g3 and not g2:
        raise InvalidArgumentError("--g3-blocks", "needs --g2-blocks > 0 to stage through")
    if args.disk_min_uses > 1 and not g3:
        raise InvalidArgumentError("--disk-min-uses", "filters G3 writes: needs --g3-blocks > 0")
    if args.workers > 1 and not g2:
        raise InvalidArgumentError("--workers", "needs --g2-blocks > 0: workers share G2 blocks")
    if args.peer_news and args.workers < 2:
        raise InvalidArgumentError("--peer-news", "needs --workers 2 or more: it is about peers")
    if args.route == "prefix" and args.workers < 2:
        raise InvalidArgumentError("--route", "prefix needs --workers 2 or more to choose from")
    with tempfile.TemporaryDirectory(prefix="kvblocks-demo-") as scratch:
        base = BlockManagerConfig.from_dims(spec.dims(size, args.dtype))
        config = dataclasses.replace(
            base,
            device_blocks=g1,
            enable_offload=g2 > 0,
            host_cache_gb=g2 * base.block_bytes / 2**30,
            disk_cache_gb=g3 * base.block_bytes / 2**30,
            offload_path=args.offload_path or scratch,
            nixl_backend="UCX" if args.workers > 1 else None,
        )
        log = sys.stderr if args.json else sys.stdout
        with contextlib.ExitStack() as stack:
            publishers = _event_publishers(args, args.workers, stack)
            router = None
            if args.route == "prefix":
                router = PrefixRouter(KvIndex(size), args.workers)
                publishers = [_indexing_publisher(router, i, p) for i, p in enumerate(publishers)]
            managers = [
                stack.enter_context(
                    BlockManager(
                        _worker_config(config, i, args.workers),
                        publisher=publishers[i],
                        disk_filter=(
                            FrequencyFilter(args.disk_min_uses) if args.disk_min_uses > 1 else None
                        ),
                    )
                )
                for i in range(args.workers)
            ]
            if args.workers > 1:
                endpoints = [m.serve("tcp://127.0.0.1:*") for m in managers]
                for manager, mine in zip(managers, endpoints, strict=True):
                    for endpoint in endpoints:
                        if endpoint != mine:
                            manager.add_peer(endpoint, news=args.peer_news)
            manager = managers[0]
            mib = config.block_bytes / 2**20
            if not args.quiet:
                turns = workload.conversations * workload.turns
                print(f"kvblocks demo: {spec.name}, {config.describe()}", file=log)
                print(
                    f"workload: {workload.conversations} conversations x {workload.turns} turns"
                    f" = {turns} requests, {workload.system_prompts} shared system prompts of"
                    f" {workload.system_tokens} tokens (seed {workload.seed})",
                    file=log,
                )
                if args.workers > 1:
                    print(
                        f"{args.workers} workers, each with the tiers below, peers of each other"
                        f" (G4); "
                        + (
                            "each request goes to the worker whose KV events say it caches"
                            " most of its prompt"
                            if router
                            else f"request i goes to worker i mod {args.workers}"
                        ),
                        file=log,
                    )
                for tier in manager.tiers:
                    n = manager.pool(tier).num_blocks
                    where = manager.layout(tier).storage.value
                    print(
                        f"  {tier.name} {tier.medium:<4} {n:>7,} blocks {n * mib:>9,.1f} MiB"
                        f" ({where})",
                        file=log,
                    )
                if args.disk_min_uses > 1 and Tier.G3 in manager.tiers:
                    print(
                        f"  G3 takes a block from its use number {args.disk_min_uses} on"
                        " (registrations and lookup hits count)",
                        file=log,
                    )
            progress = None if args.quiet else progress_bar()
            result = run_demo(
                managers, workload, progress, verify=not args.no_verify, router=router
            )
    if args.json:
        print(json.dumps({k: v for k, v in result.to_json().items() if k != "timeline"}, indent=2))
    else:
        for line in result.summary():
            print(line)
    if args.plot:
        plot_demo(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


def _indexing_publisher(router, i: int, then):
    """Worker ``i`` 's publisher: its events go to the router's index, and to ``then``."""
    from kvblocks.pool import InProcessPublisher

    publisher = InProcessPublisher()
    name = router.worker_name(i)
    publisher.subscribe(lambda batch: router.index.apply(name, batch))
    if then is not None:
        publisher.subscribe(then.publish)
    return publisher


def _worker_config(config, index: int, workers: int):
    """Worker ``index``'s config: its own folder for G3 when there are several."""
    if workers == 1 or not config.disk_cache_gb:
        return config
    folder = os.path.join(config.offload_path, f"worker-{index}")
    os.makedirs(folder, exist_ok=True)
    return dataclasses.replace(config, offload_path=folder)


def _add_block_arguments(parser: argparse.ArgumentParser, model_help: str) -> None:
    """The shape of one command's blocks: ``--model`` (or ``--layers``, ``--kv-heads``,
    ``--head-dim``), ``--outer``, ``--dtype``, ``--tokens-per-block``."""
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--layers", type=_positive_int, help="nl, instead of --model")
    parser.add_argument("--kv-heads", type=_positive_int, help="nh, instead of --model")
    parser.add_argument("--head-dim", type=_positive_int, help="hd, instead of --model")
    parser.add_argument("--outer", type=_positive_int, default=2, help="no (default 2)")
    parser.add_argument("--dtype", default="bf16", help="element type (default bf16)")
    parser.add_argument("--tokens-per-block", type=_positive_int, default=16, help="default 16")


def _add_demo_parser(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="replay a multi-turn chat workload through G1/G2/G3",
        description="Replay a seeded multi-turn chat workload with shared system prompts"
        " through a BlockManager whose G1 overflows; print hit rates per tier, blocks and"
        " bytes moved, bandwidth and prefill tokens saved. Tier sizes default to fractions of"
        " what the workload stores.",
    )
    _add_block_arguments(demo, "model dims (default llama-3.2-1b)")
    demo.add_argument("--conversations", type=_positive_int, default=24, help="default 24")
    demo.add_argument("--turns", type=_positive_int, default=5, help="per conversation (5)")
    demo.add_argument("--system-prompts", type=_positive_int, default=4, help="shared (4)")
    demo.add_argument("--system-tokens", type=_positive_int, default=512, help="each (512)")
    demo.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    demo.add_argument("--g1-blocks", type=_positive_int, help="G1 (device) blocks")
    demo.add_argument(
        "--g2-blocks", type=_non_negative_int, help="G2 (pinned host) blocks; 0: none"
    )
    demo.add_argument("--g3-blocks", type=_non_negative_int, help="G3 (disk) blocks; 0: none")
    demo.add_argument("--offload-path", help="folder of the G3 file (default: a temporary one)")
    demo.add_argument(
        "--disk-min-uses",
        type=_positive_int,
        default=1,
        metavar="N",
        help="write a block to G3 from its Nth use on (default 1: every block)",
    )
    demo.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="workers that share G2 blocks through NIXL (G4); request i goes to worker i mod N",
    )
    demo.add_argument(
        "--route",
        choices=("round-robin", "prefix"),
        default="round-robin",
        help="with --workers: request i to worker i mod N (default), or each request to the"
        " worker whose KV events say it caches most of its prompt",
    )
    demo.add_argument(
        "--peer-news",
        action="store_true",
        help="workers ask a peer only for blocks its news says it caches (add_peer(news=True))",
    )
    _add_publisher_arguments(demo)
    demo.add_argument("--no-verify", action="store_true", help="skip checking hit blocks' bytes")
    demo.add_argument("--plot", metavar="PNG", help="draw hit rate and occupancy over time")
    demo.add_argument("--json", action="store_true", help="print the results as JSON")
    demo.add_argument("--quiet", action="store_true", help="no header, no progress")
    demo.set_defaults(func=_cmd_demo)


def _add_publisher_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zmq", metavar="ENDPOINT", help="publish KV events (tcp://*:5557)")
    parser.add_argument(
        "--zmq-replay",
        metavar="ENDPOINT",
        help="with --zmq, answer replay requests here (tcp://*:5558)",
    )
    parser.add_argument(
        "--nats", metavar="URL", help="publish KV events to a NATS server (nats://host:4222)"
    )
    parser.add_argument(
        "--nats-subject", metavar="SUBJECT", help="with --nats, the subject (default kv-events)"
    )
    parser.add_argument(
        "--nats-worker",
        metavar="NAME",
        help="with --nats, the name subscribers know this worker by (default HOSTNAME-PID)",
    )
    parser.add_argument(
        "--nats-stream",
        metavar="NAME",
        help="with --nats, keep the events in this JetStream stream for later subscribers",
    )


def _event_publishers(args: argparse.Namespace, workers: int, stack: contextlib.ExitStack):
    """What each of ``workers`` workers publishes its KV events to (None each without --zmq or
    --nats): one ZMQ publisher for them all, and over NATS one per worker, named NAME-wI when
    there are several. The publishers are closed when ``stack`` closes."""
    needs_nats = ("nats_subject", "nats_worker", "nats_stream")
    for flag, needs in (("zmq_replay", "zmq"), *((f, "nats") for f in needs_nats)):
        if getattr(args, flag) is not None and not getattr(args, needs):
            raise InvalidArgumentError("--" + flag.replace("_", "-"), f"needs --{needs}")
    shared = []
    if args.zmq:
        from kvblocks.pool.publishers import ZmqPublisher

        shared.append(stack.enter_context(ZmqPublisher(args.zmq, replay_endpoint=args.zmq_replay)))
    from kvblocks.pool import FanOutPublisher

    per_worker = []
    for i in range(workers):
        parts = list(shared)
        if args.nats:
            from kvblocks.pool.nats_link import default_worker
            from kvblocks.pool.publishers import NatsPublisher

            name = args.nats_worker or default_worker()
            if workers > 1:
                name = f"{name}-w{i}"
            subject = args.nats_subject or "kv-events"
            publisher = NatsPublisher(args.nats, subject, worker=name, stream=args.nats_stream)
            parts.append(stack.enter_context(publisher))
        if len(parts) > 1:
            per_worker.append(FanOutPublisher(parts))
        else:
            per_worker.append(parts[0] if parts else None)
    return per_worker


@contextlib.contextmanager
def _stopped_by_signals():
    """An event that Ctrl-C or SIGTERM sets while the block runs (the handlers before are put
    back after), for commands that stop cleanly."""
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cmd_serve(args: argparse.Namespace) -> None:
    from kvblocks.cache_server import cache_config, serve_cache

    config = cache_config(_model_from_args(args), args.tokens_per_block, args.dtype, args.host_gb)
    with _stopped_by_signals() as stop, contextlib.ExitStack() as stack:
        (publisher,) = _event_publishers(args, 1, stack)
        serve_cache(
            config,
            args.endpoint,
            stop,
            news_endpoint=args.news_endpoint,
            publisher=publisher,
            metrics=args.metrics,
            status_every=args.status_every,
            out=sys.stdout,
            log=sys.stderr,
        )


def _add_serve_parser(sub) -> None:
    serve = sub.add_parser(
        "serve",
        help="a cache of blocks for other workers (their G4), until Ctrl-C or SIGTERM",
        description="Keep a G2 of --host-gb GiB of pinned host memory and serve it to other"
        " workers' BlockManagers: they add it with add_peer(endpoint, offload=True) to write"
        " the blocks they store there, and read from it the prefixes they miss. Prints the"
        " endpoint bound, then the news endpoint, on stdout; a status line on stderr every"
        " --status-every seconds. Needs NIXL, pyzmq and msgpack.",
    )
    _add_block_arguments(serve, "model dims of the blocks (or --layers ...)")
    serve.add_argument(
        "--host-gb", type=_positive_float, required=True, help="G2 size, GiB of host memory"
    )
    serve.add_argument(
        "--endpoint", default="tcp://*:5600", help="where to serve (default tcp://*:5600)"
    )
    serve.add_argument(
        "--news-endpoint", help="where to announce G2's changes (default: a free port)"
    )
    _add_publisher_arguments(serve)
    serve.add_argument(
        "--metrics",
        type=_host_port,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (:9400 for every interface)",
    )
    serve.add_argument(
        "--status-every", type=_positive_float, default=10.0, help="seconds (default 10)"
    )
    serve.set_defaults(func=_cmd_serve)


def _cmd_events(args: argparse.Namespace) -> None:
    from kvblocks.event_watch import Followed, NatsSource, watch_events

    replays = args.replay or []
    if not args.endpoints and not args.nats:
        raise InvalidArgumentError(
            "ENDPOINT", "is missing: name a worker's endpoint, or --nats URL"
        )
    for flag in ("subject", "stream"):
        if getattr(args, flag) is not None and not args.nats:
            raise InvalidArgumentError(f"--{flag}", "needs --nats")
    if replays and len(replays) != len(args.endpoints):
        raise InvalidArgumentError(
            "--replay",
            f"give one per endpoint, in the same order ({len(args.endpoints)}), or none;"
            f" got {len(replays)}",
        )
    if len(set(args.endpoints)) != len(args.endpoints):
        raise InvalidArgumentError("ENDPOINT", "names a worker twice")
    followed = [
        Followed(e, e, replays[i] if replays else None) for i, e in enumerate(args.endpoints)
    ]
    nats = None
    if args.nats:
        nats = NatsSource(args.nats, args.subject or "kv-events", args.stream)
    with _stopped_by_signals() as stop:
        watch_events(
            followed,
            stop,
            nats=nats,
            out=sys.stdout,
            log=sys.stderr,
            topic=args.topic,
            count=args.count,
            seconds=args.seconds,
            tokens=args.tokens,
            status_every=args.status_every,
        )


def _add_events_parser(sub) -> None:
    events = sub.add_parser(
        "events",
        help="workers' KV events as JSON lines, until Ctrl-C or SIGTERM",
        description="Follow the KV events of workers that publish them over ZMQ (kvblocks"
        " --zmq, or vLLM's --kv-events-config) or NATS (kvblocks --nats) and print one JSON"
        " object per event on stdout, in each worker's order. With a worker's replay endpoint,"
        " the events it sent before are printed first and gaps are filled; events no replay"
        ' brings back print as {"type": "Lost"}. Needs pyzmq and msgpack (and nats-py).',
    )
    events.add_argument(
        "endpoints", nargs="*", metavar="ENDPOINT", help="a worker's events (tcp://host:5557)"
    )
    events.add_argument(
        "--replay",
        action="append",
        metavar="ENDPOINT",
        help="a worker's replay endpoint; once per ENDPOINT, in the same order",
    )
    events.add_argument(
        "--topic", default="kv-events", help="the workers' topic (default kv-events; vLLM: '')"
    )
    events.add_argument(
        "--nats", metavar="URL", help="also every worker publishing to NATS (nats://host:4222)"
    )
    events.add_argument(
        "--subject", help="with --nats, the subject to read, wildcards allowed (default kv-events)"
    )
    events.add_argument(
        "--stream",
        metavar="NAME",
        help="with --nats, read the JetStream stream NAME: the events it keeps first",
    )
    events.add_argument("--count", type=_positive_int, help="stop after this many events")
    events.add_argument("--seconds", type=_positive_float, help="stop after this many seconds")
    events.add_argument("--tokens", action="store_true", help="print stored blocks' token ids")
    events.add_argument(
        "--status-every",
        type=_positive_float,
        metavar="S",
        help="every S seconds, and at the end, a line per worker on stderr: blocks per tier",
    )
    events.set_defaults(func=_cmd_events)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvblocks", description="KV cache blocks: layouts, kernels, tiers."
    )
    parser.add_argument("--version", action="version", version=f"kvblocks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser(
        "info",
        help="hardware paths; with a model, block sizes, formats and layouts",
        description="The hardware paths kvblocks can use here; given a model (--model, or"
        " --layers, --kv-heads and --head-dim), also its block sizes, formats and layouts.",
    )
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
    _add_serve_parser(sub)
    _add_events_parser(sub)
    _add_demo_parser(sub)
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
    except KeyboardInterrupt:
        # Ctrl-C: no traceback; 128 + SIGINT, as shells report it.
        return 130
    except BrokenPipeError:
        # The reader went away (`kvblocks info | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
