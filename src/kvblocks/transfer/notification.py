"""TransferCompleteNotification: the completion of a transfer, to await, wait on or poll.

A notification is one of three things:

- ready: the transfer finished before it was returned (or the caller owns synchronization);
- a CUDA event recorded after the transfer's GPU work (a ``torch.cuda.Event`` or a
  :class:`~kvblocks.kernels.cuda_calls.StreamEvent`);
- a future of work that runs on a worker thread (disk I/O, host copies, staged transfers).

A transfer that fails completes its notification with a :class:`TransferError`: ``wait()`` and
``await`` raise it, ``poll()`` returns True and :meth:`exception` returns it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures

import torch

from kvblocks.errors import KvBlocksError, TransferError
from kvblocks.kernels.cuda_calls import StreamEvent


class TransferCompleteNotification:
    """Completion of one transfer (or of several, through :meth:`aggregate`)."""

    def __init__(
        self,
        event: torch.cuda.Event | StreamEvent | None = None,
        future: Future | None = None,
        error: BaseException | None = None,
        parts: Sequence[TransferCompleteNotification] = (),
    ) -> None:
        self._event = event
        self._future = future
        self._error = error
        self._parts = tuple(parts)

    @classmethod
    def ready(cls) -> TransferCompleteNotification:
        """Already complete."""
        return cls()

    @classmethod
    def failed(cls, error: BaseException) -> TransferCompleteNotification:
        """Already complete, with ``error``."""
        return cls(error=_as_transfer_error(error))

    @classmethod
    def from_event(cls, event: torch.cuda.Event | StreamEvent) -> TransferCompleteNotification:
        """Complete when the GPU reaches ``event``."""
        return cls(event=event)

    @classmethod
    def from_future(cls, future: Future) -> TransferCompleteNotification:
        """Complete when ``future`` is done (its exception becomes the transfer's error)."""
        return cls(future=future)

    @staticmethod
    def aggregate(
        notifications: Sequence[TransferCompleteNotification],
    ) -> TransferCompleteNotification:
        """One notification that completes when all of ``notifications`` have.

        Already-complete inputs are dropped; if none is left, the result is ready (or failed
        with the first error).
        """
        pending = [n for n in notifications if not n.poll()]
        errors = [n.exception() for n in notifications if n.poll() and n.exception()]
        if errors:
            return TransferCompleteNotification.failed(errors[0])
        if not pending:
            return TransferCompleteNotification.ready()
        if len(pending) == 1:
            return pending[0]
        return TransferCompleteNotification(parts=pending)

    def poll(self) -> bool:
        """Whether the transfer is complete (successfully or not), without blocking."""
        if self._event is not None:
            return self._event.query()
        if self._future is not None:
            return self._future.done()
        return all(p.poll() for p in self._parts)

    def could_yield(self) -> bool:
        """Whether awaiting now would suspend (the transfer is still running)."""
        return not self.poll()

    def exception(self) -> TransferError | None:
        """The error of a completed, failed transfer; ``None`` if it succeeded or still runs."""
        if self._error is not None:
            return self._error
        if self._future is not None and self._future.done() and self._future.exception():
            return _as_transfer_error(self._future.exception())
        for part in self._parts:
            if part.poll() and part.exception() is not None:
                return part.exception()
        return None

    def wait(self, timeout: float | None = None) -> None:
        """Block until complete; raise the transfer's :class:`TransferError` if it failed.

        Raises:
            TimeoutError: ``timeout`` seconds passed first (only for work on worker threads).
        """
        if self._error is not None:
            raise self._error
        if self._event is not None:
            try:
                self._event.synchronize()
            except (RuntimeError, KvBlocksError) as exc:
                raise TransferError(f"the transfer's GPU work failed: {exc}") from exc
            return
        if self._future is not None:
            done, _ = wait_futures([self._future], timeout=timeout)
            if not done:
                raise TimeoutError(f"the transfer did not complete within {timeout} s")
            if self._future.exception() is not None:
                raise _as_transfer_error(self._future.exception())
            return
        for part in self._parts:
            part.wait(timeout)

    def wait_on_stream(self, stream: torch.cuda.Stream | None) -> None:
        """Make ``stream``'s later work wait for the transfer: without blocking the host where
        the transfer is GPU work (a CUDA event); other transfers (work on a worker thread, or
        ``stream`` None) are waited for on the host, as :meth:`wait` does.

        Raises:
            TransferError: the transfer failed (found while waiting on the host).
        """
        if self._event is not None and stream is not None:
            stream.wait_event(self._event)
        elif self._parts:
            for part in self._parts:
                part.wait_on_stream(stream)
        else:
            self.wait()

    def __await__(self) -> Generator:
        return self._wait_async().__await__()

    async def _wait_async(self) -> None:
        if self._future is not None:
            try:
                await asyncio.wrap_future(self._future)
            except Exception as exc:
                raise _as_transfer_error(exc) from exc
            return
        if not self.poll():
            await asyncio.get_running_loop().run_in_executor(None, self.wait)
        self.wait()


def _as_transfer_error(error: BaseException) -> TransferError:
    if isinstance(error, TransferError):
        return error
    failed = TransferError(f"the transfer failed: {error}")
    failed.__cause__ = error
    return failed
