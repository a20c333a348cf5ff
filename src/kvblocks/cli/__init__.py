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
import os
import sys
from collections.abc import Sequence

from kvblocks import __version__
from kvblocks.cli import bench, demo, events, info, serve
from kvblocks.cli.info import format_bytes
from kvblocks.errors import KvBlocksError

__all__ = ["build_parser", "format_bytes", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvblocks", description="KV cache blocks: layouts, kernels, tiers."
    )
    parser.add_argument("--version", action="version", version=f"kvblocks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info.add_parsers(sub)
    bench.add_parser(sub)
    serve.add_parser(sub)
    events.add_parser(sub)
    demo.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
