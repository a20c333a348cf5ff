"""The ``--zmq`` and ``--nats`` arguments of the commands that publish KV events, and the
publishers they ask for."""

from __future__ import annotations

import argparse
import contextlib

from kvblocks.errors import InvalidArgumentError


def add_publisher_arguments(parser: argparse.ArgumentParser) -> None:
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


def event_publishers(args: argparse.Namespace, workers: int, stack: contextlib.ExitStack):
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
