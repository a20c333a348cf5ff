"""Disk storage: a file per layout, and threaded reads and writes between it and host memory.

Space for the whole file is reserved at allocation (``posix_fallocate``), so a full disk fails
then, not in the middle of a transfer. The file is opened twice: with ``O_DIRECT`` where the
filesystem allows it (bypassing the page cache), and buffered. A span whose file offset, memory
address and size are all multiples of :data:`DIRECT_ALIGN` goes through the direct descriptor;
any other span goes through the buffered one.

Spans are ``(file_offset, address, size)``: ``address`` is host memory (pinned or system).
Neighbouring spans that are contiguous in both the file and memory are merged into one I/O of up
to :data:`MAX_IO_BYTES`, and the I/Os run on a thread pool.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable
from concurrent.futures import Executor, ThreadPoolExecutor

import torch

from kvblocks.errors import InvalidArgumentError, StorageError
from kvblocks.storage.kinds import StorageKind
from kvblocks.storage.memory import Allocation

#: Alignment O_DIRECT needs of offsets, addresses and sizes (a page; safe on every filesystem).
DIRECT_ALIGN = 4096
#: Largest single read or write after merging spans.
MAX_IO_BYTES = 8 << 20

Span = tuple[int, int, int]


class DiskAllocation(Allocation):
    """A file of ``size`` bytes at ``path``, created (or truncated) for one layout.

    Args:
        path: the file; its directory must exist and be writable.
        size: bytes to reserve.
        keep: keep the file on release (by default it is deleted).
        reuse: keep the contents of an existing file at ``path`` (grown to ``size`` if
            shorter) instead of truncating it, so a layout can find what an earlier process
            stored.

    Raises:
        StorageError: the directory is missing or not writable, or the disk has no room.
    """

    def __init__(
        self, path: str | os.PathLike, size: int, keep: bool = False, reuse: bool = False
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidArgumentError("size", f"must be a positive number of bytes, got {size!r}")
        super().__init__(StorageKind.DISK, size)
        self.path = os.fspath(path)
        self.keep = keep
        flags = os.O_RDWR | os.O_CREAT | (0 if reuse else os.O_TRUNC)
        try:
            self._fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot create the file: {exc.strerror}", self.path) from None
        try:
            os.posix_fallocate(self._fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                self._close(unlink=not reuse)
                if exc.errno in (errno.ENOSPC, errno.EFBIG):
                    raise StorageError(
                        f"no room for {size} bytes on this disk", self.path
                    ) from None
                raise StorageError(
                    f"cannot reserve {size} bytes: {exc.strerror}", self.path
                ) from None
            if os.fstat(self._fd).st_size < size:
                os.ftruncate(self._fd, size)
        self._direct_fd = self._open_direct()

    def _open_direct(self) -> int | None:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            return os.open(self.path, os.O_RDWR | flag)
        except OSError:  # tmpfs and some others refuse O_DIRECT
            return None

    @property
    def direct(self) -> bool:
        """Whether aligned spans bypass the page cache."""
        return self._direct_fd is not None

    def view(self) -> torch.Tensor:
        """The file mapped into memory (through the page cache), for inspection and tests.

        Do not read it while a transfer to the file is running.
        """
        self.check_alive()
        return torch.from_file(self.path, shared=True, size=self.size, dtype=torch.uint8)

    def read(self, spans: Iterable[Span], pool: Executor | None = None) -> None:
        """Copy ``(file_offset, address, size)`` spans from the file into host memory."""
        self._run(spans, pool, write=False)

    def write(self, spans: Iterable[Span], pool: Executor | None = None) -> None:
        """Copy ``(file_offset, address, size)`` spans from host memory into the file."""
        self._run(spans, pool, write=True)

    def sync(self) -> None:
        """Flush the file to the disk (``fsync``)."""
        self.check_alive()
        os.fsync(self._fd)

    def _run(self, spans: Iterable[Span], pool: Executor | None, write: bool) -> None:
        self.check_alive()
        ios = merge_spans(spans)
        for offset, _, size in ios:
            if offset < 0 or offset + size > self.size:
                raise StorageError(
                    f"span [{offset}, {offset + size}) is outside the file's {self.size} bytes",
                    self.path,
                )
        if pool is None or len(ios) == 1:
            for io in ios:
                self._io(io, write)
            return
        for future in [pool.submit(self._io, io, write) for io in ios]:
            future.result()

    def _io(self, span: Span, write: bool) -> None:
        offset, addr, size = span
        aligned = (
            offset % DIRECT_ALIGN == 0 and addr % DIRECT_ALIGN == 0 and size % DIRECT_ALIGN == 0
        )
        fd = self._direct_fd if aligned and self._direct_fd is not None else self._fd
        done = 0
        while done < size:
            buf = (ctypes.c_char * (size - done)).from_address(addr + done)
            try:
                if write:
                    n = os.pwritev(fd, [buf], offset + done)
                else:
                    n = os.preadv(fd, [buf], offset + done)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise StorageError("the disk is full", self.path) from None
                raise StorageError(
                    f"{'write' if write else 'read'} of {size} bytes at {offset} failed: "
                    f"{exc.strerror}",
                    self.path,
                ) from None
            if n == 0:
                raise StorageError(
                    f"the file ends before byte {offset + size} (was it truncated?)", self.path
                )
            done += n

    def _close(self, unlink: bool) -> None:
        os.close(self._fd)
        if not unlink:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _free(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)
        self._close(unlink=not self.keep)


def merge_spans(spans: Iterable[Span], max_io: int = MAX_IO_BYTES) -> list[Span]:
    """Sort spans by file offset and merge neighbours contiguous in both file and memory."""
    merged: list[list[int]] = []
    for offset, addr, size in sorted(spans):
        last = merged[-1] if merged else None
        if (
            last is not None
            and last[0] + last[2] == offset
            and last[1] + last[2] == addr
            and last[2] + size <= max_io
        ):
            last[2] += size
        else:
            merged.append([offset, addr, size])
    return [(o, a, s) for o, a, s in merged]


def io_pool(threads: int = 8) -> ThreadPoolExecutor:
    """A thread pool for disk I/O (reads and writes release the GIL)."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvblocks-disk")
