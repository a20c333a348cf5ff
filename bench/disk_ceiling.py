"""What the disk under a folder reads and writes at, with O_DIRECT, by threads and I/O size.

The ceiling that G3's reads and writes (``kvblocks bench disk``, ``bench/ttft.py``) are
measured against: a file of ``--mib`` MiB is written once, then read whole with each
combination of ``--threads`` and ``--io-mib`` (each thread reads I/Os of that size at offsets
taken in turn), then written again with each thread count at 8 MiB. O_DIRECT bypasses the page
cache, so every byte comes from the device.

Columns: ``op`` (read or write), ``threads``, ``io_mib``, ``gbps`` (10^9 bytes per second).

Usage: python bench/disk_ceiling.py DIR [--mib 4096] [--threads 1,4,8,16,32,64]
    [--io-mib 1,8,32] > disk-ceiling.csv
"""

from __future__ import annotations

import argparse
import csv
import mmap
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

WRITE_IO_MIB = 8


def run_ios(path: str, size: int, threads: int, io: int, write: bool) -> float:
    """Read or write the ``size`` bytes of ``path`` in I/Os of ``io`` bytes on ``threads``
    threads (O_DIRECT; each thread its own page-aligned buffer; I/Os no larger than the file);
    returns bytes per second."""
    io = min(io, size)
    flags = (os.O_WRONLY if write else os.O_RDONLY) | os.O_DIRECT
    fd = os.open(path, flags)
    local = threading.local()

    def one(offset: int) -> None:
        buffer = getattr(local, "buffer", None)
        if buffer is None:
            buffer = local.buffer = mmap.mmap(-1, io)  # page-aligned, as O_DIRECT needs
            if write:
                buffer.write(os.urandom(io))
        if write:
            os.pwritev(fd, [buffer], offset)
        else:
            os.preadv(fd, [buffer], offset)

    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(0, size, io)))
        if write:
            os.fsync(fd)
        return size / (time.perf_counter() - start)
    finally:
        os.close(fd)


def positive_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a folder on the disk to measure")
    parser.add_argument("--mib", type=int, default=4096, help="file size (default 4,096 MiB)")
    parser.add_argument("--threads", type=positive_ints, default=[1, 4, 8, 16, 32, 64])
    parser.add_argument("--io-mib", type=positive_ints, default=[1, 8, 32])
    args = parser.parse_args(argv)
    if args.mib < 1:
        parser.error("--mib must be >= 1")
    if not os.path.isdir(args.folder):
        parser.error(f"{args.folder!r} is not a folder")
    try:
        measure(args.folder, args.mib << 20, args.threads, args.io_mib)
    except OSError as exc:  # no room, or a filesystem without O_DIRECT (tmpfs)
        print(f"disk_ceiling: {exc}", file=sys.stderr)
        return 1
    return 0


def measure(folder: str, size: int, thread_counts: list[int], io_sizes_mib: list[int]) -> None:
    """Write the CSV of the module's docstring to stdout, for a file of ``size`` bytes in a
    temporary folder under ``folder``."""
    writer = csv.writer(sys.stdout)
    writer.writerow(["op", "threads", "io_mib", "gbps"])
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        path = os.path.join(scratch, "ceiling.bin")
        with open(path, "wb") as f:
            f.truncate(size)
        run_ios(path, size, 8, WRITE_IO_MIB << 20, write=True)  # every block allocated
        for io_mib in io_sizes_mib:
            for threads in thread_counts:
                rate = run_ios(path, size, threads, io_mib << 20, write=False)
                writer.writerow(["read", threads, io_mib, round(rate / 1e9, 2)])
                sys.stdout.flush()
        for threads in thread_counts:
            rate = run_ios(path, size, threads, WRITE_IO_MIB << 20, write=True)
            writer.writerow(["write", threads, WRITE_IO_MIB, round(rate / 1e9, 2)])


if __name__ == "__main__":
    sys.exit(main())
