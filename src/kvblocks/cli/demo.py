"""``kvblocks demo``: a multi-turn chat workload through BlockManagers with G1, G2 and G3."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile

from kvblocks.cli.common import (
    add_block_arguments,
    check_plot,
    model_from_args,
    non_negative_int,
    positive_int,
)
from kvblocks.cli.publishing import add_publisher_arguments, event_publishers
from kvblocks.errors import InvalidArgumentError


def _cmd_demo(args: argparse.Namespace) -> None:
    from kvblocks.demo import ChatWorkload, PrefixRouter, plot_demo, progress_bar, run_demo
    from kvblocks.layout import KvBlockLayout
    from kvblocks.pool import (
        BlockManager,
        BlockManagerConfig,
        DeviceLayout,
        FrequencyFilter,
        KvIndex,
        Tier,
    )

    check_plot(args.plot)
    if args.model is None and args.layers is None:
        args.model = "llama-3.2-1b"
    spec = model_from_args(args)
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
            device_layout=DeviceLayout[args.device_layout.upper().replace("-", "_")],
            device_format=KvBlockLayout.OperationalHND
            if args.device_format == "hnd"
            else KvBlockLayout.OperationalNHD,
        )
        log = sys.stderr if args.json else sys.stdout
        with contextlib.ExitStack() as stack:
            publishers = event_publishers(args, args.workers, stack)
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
                    if tier is Tier.G1:
                        where += f", {args.device_layout} {args.device_format.upper()}"
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


def add_parser(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="replay a multi-turn chat workload through G1/G2/G3",
        description="Replay a seeded multi-turn chat workload with shared system prompts"
        " through a BlockManager whose G1 overflows; print hit rates per tier, blocks and"
        " bytes moved, bandwidth and prefill tokens saved. Tier sizes default to fractions of"
        " what the workload stores.",
    )
    add_block_arguments(demo, "model dims (default llama-3.2-1b)")
    demo.add_argument("--conversations", type=positive_int, default=24, help="default 24")
    demo.add_argument("--turns", type=positive_int, default=5, help="per conversation (5)")
    demo.add_argument("--system-prompts", type=positive_int, default=4, help="shared (4)")
    demo.add_argument("--system-tokens", type=positive_int, default=512, help="each (512)")
    demo.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    demo.add_argument("--g1-blocks", type=positive_int, help="G1 (device) blocks")
    demo.add_argument("--g2-blocks", type=non_negative_int, help="G2 (pinned host) blocks; 0: none")
    demo.add_argument("--g3-blocks", type=non_negative_int, help="G3 (disk) blocks; 0: none")
    demo.add_argument("--offload-path", help="folder of the G3 file (default: a temporary one)")
    demo.add_argument(
        "--device-layout",
        choices=("block-first", "outer-first", "outer-separate", "fully-contiguous"),
        default="block-first",
        help="G1's tensors: per layer [blocks, K/V, ...] (default), per layer [K/V, blocks, ...]"
        " (vLLM's FlashAttention), per layer a K and a V [blocks, ...] (SGLang), or one"
        " [blocks, layers, K/V, ...]",
    )
    demo.add_argument(
        "--device-format",
        choices=("nhd", "hnd"),
        default="nhd",
        help="the order inside G1's pages: [tokens, heads, head_dim] (default) or heads first",
    )
    demo.add_argument(
        "--disk-min-uses",
        type=positive_int,
        default=1,
        metavar="N",
        help="write a block to G3 from its Nth use on (default 1: every block)",
    )
    demo.add_argument(
        "--workers",
        type=positive_int,
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
    add_publisher_arguments(demo)
    demo.add_argument("--no-verify", action="store_true", help="skip checking hit blocks' bytes")
    demo.add_argument("--plot", metavar="PNG", help="draw hit rate and occupancy over time")
    demo.add_argument("--json", action="store_true", help="print the results as JSON")
    demo.add_argument("--quiet", action="store_true", help="no header, no progress")
    demo.set_defaults(func=_cmd_demo)
