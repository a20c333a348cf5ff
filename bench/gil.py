"""What a Python thread that never waits costs a lookup: the manager's host work (issuing the
copies into G1, polling NIXL) needs the GIL back after each call that lets it go, and a thread
that runs Python without blocking keeps it for a whole switch interval each time.

One BlockManager holds a prompt of ``--blocks`` blocks in G2 (Llama-3.1-70B's layer shape:
8 KV heads of 128, bf16, 16 tokens per block, ``--layers`` layers). For each switch interval
(``sys.setswitchinterval``: Python's default 5 ms, and 0.5 ms), ``--repeats`` lookups copy
the prompt back from G2 into G1 (G1 emptied before each), first with nothing beside them,
then beside a thread that counts in a Python loop. Then the same from G3: a manager with a
disk cache in ``--offload-path`` stores the prompt in its G3 file, and each lookup is made by
a new manager on that file (G1 and G2 empty, as after a restart), which reads the blocks into
G2, checks them against their checksums and copies them on into G1. With ``--peer`` (NIXL,
UCX), a second manager in this process serves the prompts from its G2 and the first reads
them from it (its tiers cleared before each lookup), in the same four ways.

Columns: ``source`` (``G2``, ``G3`` or ``G4``), ``switch_ms``, ``beside`` (``nothing`` or
``python_loop``), ``lookup_ms`` (median wall time of ``lookup``), ``read_ms`` (median time of
the reads into G2 from the disk or the peer; G3 and G4 rows), ``copy_ms`` (median time of the
copies from G2 into G1), ``slowdown`` (``lookup_ms`` over the same source and switch
interval's with nothing beside it). Every hit's blocks are checked against the blocks stored.

Usage: python bench/gil.py [--layers 20] [--blocks 256] [--repeats 5] [--offload-path DIR]
[--peer] > gil.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import replace

import torch

from kvblocks.benchmarks.sharing import store_random
from kvblocks.benchmarks.timing import gpu_name
from kvblocks.pool import BlockManager, BlockManagerConfig, Tier
from kvblocks.remote import nixl_available

FIELDS = [
    "gpu",
    "layers",
    "blocks",
    "source",
    "switch_ms",
    "beside",
    "lookup_ms",
    "read_ms",
    "copy_ms",
    "slowdown",
]
#: Switch intervals timed, in seconds (Python's default first).
SWITCH_INTERVALS = (0.005, 0.0005)
BLOCK_SIZE = 16
#: The copies a lookup times: reads into G2 (from the disk, from the peer), copies into G1.
_COPIES = ((Tier.G3, Tier.G2), (Tier.G4, Tier.G2), (Tier.G2, Tier.G1))
#: A manager to look the prompt up in, for each lookup in turn (by its number).
Managers = Callable[[int], AbstractContextManager[BlockManager]]


@contextmanager
def python_loop(on: bool) -> Iterator[None]:
    """A thread counting in a Python loop, which never waits, while the block runs."""
    stop = threading.Event()

    def count() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    thread = threading.Thread(target=count, daemon=True) if on else None
    if thread is not None:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread is not None:
            thread.join()


def store(manager: BlockManager, tokens: list[int]) -> list[torch.Tensor]:
    """Random KV for ``tokens`` in G1, registered, offloaded to G2; returns it per layer."""
    blocks = store_random(manager, tokens, BLOCK_SIZE)
    index = torch.tensor(blocks, device=manager.device_tensors[0].device)
    return [t[index].clone() for t in manager.device_tensors]


def looked_up_in(manager: BlockManager, source: Tier) -> Managers:
    """``manager`` for each lookup, its tiers above ``source`` emptied first: G1 (a G2 hit) or
    every tier (a G4 hit)."""

    def prepared(_: int) -> AbstractContextManager[BlockManager]:
        if source is Tier.G4:
            manager.clear()
        else:
            manager.free(manager.allocate(manager.pool(Tier.G1).num_blocks))  # G1 forgets it
        return nullcontext(manager)

    return prepared


def time_lookups(
    managers: Managers, tokens: list[int], kv: list[torch.Tensor], source: Tier, repeats: int
) -> tuple[float, float, float]:
    """Median seconds of ``repeats`` lookups of ``tokens`` from ``source`` (after one more),
    of their reads into G2, and of their copies into G1."""
    lookups, reads, copies = [], [], []
    for i in range(repeats + 1):
        with managers(i) as manager:
            metrics = manager.metrics
            before = [metrics.onboard_seconds[pair] for pair in _COPIES]
            start = time.perf_counter()
            hit = manager.lookup(tokens)
            seconds = time.perf_counter() - start
            after = [metrics.onboard_seconds[pair] for pair in _COPIES]
            check(manager, hit, kv, source)
            manager.free(hit.block_ids)
        if i:
            lookups.append(seconds)
            reads.append(after[0] - before[0] + after[1] - before[1])
            copies.append(after[2] - before[2])
    return statistics.median(lookups), statistics.median(reads), statistics.median(copies)


def check(manager: BlockManager, hit, kv: list[torch.Tensor], source: Tier) -> None:
    """Raise unless every block of ``kv`` came back from ``source``, bit for bit."""
    if hit.from_tier.get(source, 0) != len(kv[0]):
        raise RuntimeError(f"expected {len(kv[0])} blocks from {source.name}, got {hit.from_tier}")
    index = torch.tensor(hit.block_ids, device=manager.device_tensors[0].device)
    for t, want in zip(manager.device_tensors, kv, strict=True):
        if not torch.equal(t[index].view(torch.int16), want.view(torch.int16)):
            raise RuntimeError(f"a block that came back from {source.name} differs: no figures")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=20, help="layers of the cache (20)")
    parser.add_argument("--blocks", type=int, default=256, help="blocks of the prompt (256)")
    parser.add_argument("--repeats", type=int, default=5, help="lookups timed per case (5)")
    parser.add_argument(
        "--offload-path",
        default=tempfile.gettempdir(),
        help="folder for the G3 file, removed after (default: the system's temporary folder)",
    )
    parser.add_argument("--peer", action="store_true", help="also read from a peer (NIXL)")
    args = parser.parse_args(argv)
    if min(args.layers, args.blocks, args.repeats) < 1:
        parser.error("--layers, --blocks and --repeats must be >= 1")
    if args.peer and not nixl_available():
        parser.error("--peer reads through NIXL, which is not installed here (pip install nixl)")

    shape = BlockManagerConfig(
        num_layers=args.layers,
        num_kv_heads=8,
        head_dim=128,
        block_size=BLOCK_SIZE,
        dtype="bf16",
        device_blocks=args.blocks + 1,
        nixl_backend="UCX" if args.peer else None,
    )
    config = replace(
        shape, enable_offload=True, host_cache_gb=(args.blocks + 1) * shape.block_bytes / 2**30
    )
    tokens = list(range(args.blocks * BLOCK_SIZE))
    out = csv.DictWriter(sys.stdout, FIELDS, lineterminator="\n")
    out.writeheader()
    default_switch = sys.getswitchinterval()
    with ExitStack() as managers:
        here = managers.enter_context(BlockManager(config))
        stored = {Tier.G2: (store(here, tokens), looked_up_in(here, Tier.G2))}
        folder = managers.enter_context(tempfile.TemporaryDirectory(dir=args.offload_path))
        on_disk = replace(config, disk_cache_gb=2 * config.host_cache_gb, offload_path=folder)
        with BlockManager(on_disk) as writer:
            kv = store(writer, tokens)
            writer.flush()  # in G3 now
        stored[Tier.G3] = (kv, lambda _: BlockManager(on_disk))  # a restart per lookup
        if args.peer:  # the peer's own KV for the same tokens: G4's hits come back as it
            there = managers.enter_context(BlockManager(config))
            kv = store(there, tokens)
            here.add_peer(there.serve("tcp://127.0.0.1:*"))
            stored[Tier.G4] = (kv, looked_up_in(here, Tier.G4))
        try:
            for source, (kv, lookup_managers) in stored.items():
                for switch in SWITCH_INTERVALS:
                    sys.setswitchinterval(switch)
                    alone = None
                    for beside in ("nothing", "python_loop"):
                        with python_loop(beside == "python_loop"):
                            lookup_s, read_s, copy_s = time_lookups(
                                lookup_managers, tokens, kv, source, args.repeats
                            )
                        alone = alone or lookup_s
                        out.writerow(
                            {
                                "gpu": gpu_name(),
                                "layers": args.layers,
                                "blocks": args.blocks,
                                "source": source.name,
                                "switch_ms": switch * 1e3,
                                "beside": beside,
                                "lookup_ms": round(lookup_s * 1e3, 2),
                                "read_ms": "" if source is Tier.G2 else round(read_s * 1e3, 2),
                                "copy_ms": round(copy_s * 1e3, 2),
                                "slowdown": round(lookup_s / alone, 2),
                            }
                        )
                        sys.stdout.flush()
        finally:
            sys.setswitchinterval(default_switch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
