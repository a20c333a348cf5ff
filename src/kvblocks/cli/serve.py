"""``kvblocks serve``: a cache of blocks for other workers (their tier G4), until stopped."""

from __future__ import annotations

import argparse
import contextlib
import sys

from kvblocks.cli.common import (
    add_block_arguments,
    host_port,
    model_from_args,
    positive_float,
    stopped_by_signals,
)
from kvblocks.cli.publishing import add_publisher_arguments, event_publishers


def _cmd_serve(args: argparse.Namespace) -> None:
    from kvblocks.cache_server import cache_config, serve_cache

    config = cache_config(model_from_args(args), args.tokens_per_block, args.dtype, args.host_gb)
    with stopped_by_signals() as stop, contextlib.ExitStack() as stack:
        (publisher,) = event_publishers(args, 1, stack)
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


def add_parser(sub) -> None:
    serve = sub.add_parser(
        "serve",
        help="a cache of blocks for other workers (their G4), until Ctrl-C or SIGTERM",
        description="Keep a G2 of --host-gb GiB of pinned host memory and serve it to other"
        " workers' BlockManagers: they add it with add_peer(endpoint, offload=True) to write"
        " the blocks they store there, and read from it the prefixes they miss. Prints the"
        " endpoint bound, then the news endpoint, on stdout; a status line on stderr every"
        " --status-every seconds. Needs NIXL, pyzmq and msgpack.",
    )
    add_block_arguments(serve, "model dims of the blocks (or --layers ...)")
    serve.add_argument(
        "--host-gb", type=positive_float, required=True, help="G2 size, GiB of host memory"
    )
    serve.add_argument(
        "--endpoint", default="tcp://*:5600", help="where to serve (default tcp://*:5600)"
    )
    serve.add_argument(
        "--news-endpoint", help="where to announce G2's changes (default: a free port)"
    )
    add_publisher_arguments(serve)
    serve.add_argument(
        "--metrics",
        type=host_port,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (:9400 for every interface)",
    )
    serve.add_argument(
        "--status-every", type=positive_float, default=10.0, help="seconds (default 10)"
    )
    serve.set_defaults(func=_cmd_serve)
