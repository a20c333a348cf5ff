"""A NATS connection for code that is not async: the client runs on its own asyncio loop in a
background thread (used by :class:`~kvblocks.pool.publishers.NatsPublisher` and
:class:`~kvblocks.pool.nats_subscriber.NatsSubscriber`).

The headers kvblocks puts on each KV event batch it publishes over NATS:

- :data:`WORKER_HEADER`: the name of the worker that sent it, so that one subject can carry
  many workers;
- :data:`SEQ_HEADER`: the batch's number in the worker's stream, from 0 (decimal), so that a
  subscriber can tell a lost batch (core NATS delivers at most once) and a restarted worker;
- :data:`ALIVE_HEADER`: the seconds between the worker's heartbeats, where it sends them.

A heartbeat is a message with no payload on the same subject (so that it comes in order with
the batches) whose :data:`NEXT_SEQ_HEADER` is the seq of the worker's next batch: a subscriber
that has not heard a worker for a few heartbeats knows it is gone, and one that missed the
worker's last batches knows that too.

With a JetStream stream (:func:`ensure_stream`), the server also keeps the batches published on
the stream's subjects, so that a subscriber that comes later reads them from the first kept.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any

from kvblocks.errors import BackendUnavailableError, InvalidArgumentError, TransferError

WORKER_HEADER = "Kvblocks-Worker"
SEQ_HEADER = "Kvblocks-Seq"
ALIVE_HEADER = "Kvblocks-Alive-Every"
NEXT_SEQ_HEADER = "Kvblocks-Next-Seq"


def default_worker() -> str:
    """The name a worker publishes under unless told: ``"<hostname>-<pid>"``."""
    return f"{socket.gethostname()}-{os.getpid()}"


def check_subject(subject: str, wildcards: bool) -> str:
    """``subject`` if it is a NATS subject (with ``*`` and ``>`` tokens when ``wildcards``).

    Raises:
        InvalidArgumentError: it is not.
    """
    tokens = subject.split(".") if isinstance(subject, str) else [""]
    bad = any(
        not t or any(c.isspace() for c in t) or (not wildcards and ("*" in t or ">" in t))
        for t in tokens
    )
    if bad or (">" in tokens and tokens.index(">") != len(tokens) - 1):
        kind = "NATS subject" if wildcards else "NATS subject without wildcards"
        raise InvalidArgumentError("subject", f"must be a {kind}, got {subject!r}")
    return subject


def check_stream(stream: str) -> str:
    """``stream`` if it can name a JetStream stream (printable, no spaces, ``.``, ``*``,
    ``>``, ``/`` or ``\\``).

    Raises:
        InvalidArgumentError: it cannot.
    """
    if (
        not isinstance(stream, str)
        or not stream.isprintable()
        or not stream
        or any(c.isspace() or c in ".*>/\\" for c in stream)
    ):
        raise InvalidArgumentError("stream", f"must be a JetStream stream name, got {stream!r}")
    return stream


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether ``subject`` is one of those ``pattern`` names (``*`` one token, ``>`` the rest)."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


async def ensure_stream(
    client, name: str, subject: str, max_bytes: int, add_subject: bool = True
) -> None:
    """Make JetStream keep what is published on ``subject`` in the stream ``name``: create the
    stream (file storage, the oldest messages dropped past ``max_bytes``), or, with
    ``add_subject``, add ``subject`` to it where none of its subjects covers it (a subscriber
    passes False: the subjects it reads may span several of the stream's).

    Raises:
        TransferError: the server has no JetStream, or refuses the stream.
    """
    from nats.js.api import DiscardPolicy, StreamConfig
    from nats.js.errors import NotFoundError

    js = client.jetstream()
    try:
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            config = StreamConfig(
                name=name, subjects=[subject], max_bytes=max_bytes, discard=DiscardPolicy.OLD
            )
            await js.add_stream(config)
            return
        subjects = list(info.config.subjects or [])
        if add_subject and not any(subject_matches(s, subject) for s in subjects):
            info.config.subjects = [*subjects, subject]
            await js.update_stream(info.config)
    except Exception as exc:
        raise TransferError(
            f"JetStream stream {name!r} for {subject!r}: {exc!r} (does the server run with -js?)"
        ) from None


class NatsLink:
    """One NATS client on a loop of its own.

    Args:
        url: the server, ``"nats://127.0.0.1:4222"``.
        name: the name of the loop's thread, and of the client to the server.
        connect_timeout: seconds to wait for the first connection.
        error_cb, disconnected_cb: the client's callbacks (coroutines, run on the loop).

    Raises:
        BackendUnavailableError: nats-py is not installed.
        TransferError: no server answered in time.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        connect_timeout: float = 5.0,
        error_cb: Callable[[Exception], Awaitable[None]] | None = None,
        disconnected_cb: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        try:
            import nats
        except ImportError:
            raise BackendUnavailableError(
                "nats-py is not installed: pip install 'kvblocks[events]'"
            ) from None
        if not connect_timeout > 0:
            raise InvalidArgumentError(
                "connect_timeout", f"must be > 0 seconds, got {connect_timeout!r}"
            )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        try:
            self.client = self.run(
                nats.connect(
                    url,
                    name=name,
                    connect_timeout=connect_timeout,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    error_cb=error_cb,
                    disconnected_cb=disconnected_cb,
                ),
                timeout=connect_timeout + 1,
            )
        except Exception as exc:
            self._stop_loop()
            raise TransferError(f"cannot connect to NATS at {url}: {exc!r}") from None

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float) -> Any:
        """Run ``coroutine`` on the loop and wait at most ``timeout`` seconds for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def submit(self, coroutine: Coroutine[Any, Any, Any]) -> Future:
        """Start ``coroutine`` on the loop without waiting; coroutines start in the order given."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is pending, close the connection and stop the loop (idempotent)."""
        if self._loop.is_closed():
            return
        try:
            self.run(self.client.drain(), timeout)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_the_rest(), 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
