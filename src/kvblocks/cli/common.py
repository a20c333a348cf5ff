"""What several commands share: argument types, checks of file arguments, the model a
command's arguments name, and stopping cleanly on a signal."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading

from kvblocks.benchmarks.plot import require_matplotlib
from kvblocks.errors import InvalidArgumentError
from kvblocks.models import ModelSpec, lookup_model


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def int_at_least(minimum: int, what: str):
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


positive_int = int_at_least(1, "a positive int")
non_negative_int = int_at_least(0, "an int >= 0")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``:PORT`` for every interface) as ``(host, port)``."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "0.0.0.0", int(port)


def model_from_args(args: argparse.Namespace) -> ModelSpec:
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


def check_output(flag: str, path: str | None) -> None:
    """Fail before any long work if ``path`` (given with ``flag``) cannot be a file we write."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InvalidArgumentError(flag, f"is in a folder that does not exist: {folder}")
    if os.path.isdir(path):
        raise InvalidArgumentError(flag, f"names a folder, not a file: {path}")


def check_plot(path: str | None) -> None:
    """``--plot PNG``: a file we can write, and matplotlib to draw it."""
    if path is not None:
        check_output("--plot", path)
        require_matplotlib()


def add_block_arguments(parser: argparse.ArgumentParser, model_help: str) -> None:
    """The shape of one command's blocks: ``--model`` (or ``--layers``, ``--kv-heads``,
    ``--head-dim``), ``--outer``, ``--dtype``, ``--tokens-per-block``."""
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--layers", type=positive_int, help="nl, instead of --model")
    parser.add_argument("--kv-heads", type=positive_int, help="nh, instead of --model")
    parser.add_argument("--head-dim", type=positive_int, help="hd, instead of --model")
    parser.add_argument("--outer", type=positive_int, default=2, help="no (default 2)")
    parser.add_argument("--dtype", default="bf16", help="element type (default bf16)")
    parser.add_argument("--tokens-per-block", type=positive_int, default=16, help="default 16")


@contextlib.contextmanager
def stopped_by_signals():
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
