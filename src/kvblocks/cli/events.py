"""``kvblocks events``: workers' KV events as JSON lines, and what each worker holds."""

from __future__ import annotations

import argparse
import sys

from kvblocks.cli.common import positive_float, positive_int, stopped_by_signals
from kvblocks.errors import InvalidArgumentError


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
    with stopped_by_signals() as stop:
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


def add_parser(sub) -> None:
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
    events.add_argument("--count", type=positive_int, help="stop after this many events")
    events.add_argument("--seconds", type=positive_float, help="stop after this many seconds")
    events.add_argument("--tokens", action="store_true", help="print stored blocks' token ids")
    events.add_argument(
        "--status-every",
        type=positive_float,
        metavar="S",
        help="every S seconds, and at the end, a line per worker on stderr: blocks per tier",
    )
    events.set_defaults(func=_cmd_events)
