"""Pinned memory near the GPU and far from it: host <-> device bandwidth by NUMA node.

For each GPU and each NUMA node online, the G2 <-> G1 path of a BlockManager: 128 blocks of
Llama-3.1-70B (16 tokens per block, 640 MiB) between a pinned fully contiguous ``UniversalTP``
layout placed on that node (:mod:`kvblocks.storage.numa`) and a device layout of the engine's
shape (one tensor per layer, NHD), both directions, through a TransferManager with its default
routes (staged through device memory at this size) and with the kernels alone; and one bulk
copy of the same bytes between the pinned buffer and the device (the copy engine). Each case is
timed interleaved with the same case over pinned memory the system placed (``os``: the pages
where this thread first touched them), so both see the same clocks and link. Every transfer's
first block is checked.

On a machine with one NUMA node there is nothing to compare: the script says so and exits 0.

CSV on stdout: gpu, gpu_index, gpu_node, host_node, path, direction, gbps, os_gbps, ratio
(``gbps / os_gbps``). Progress on stderr.
Usage: python bench/numa.py [--gpus 0,1] [--iters 50] > numa.csv   (needs a CUDA GPU)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from kvblocks.benchmarks.timing import gbps, median_ms, progress, require_gpu, write_csv
from kvblocks.errors import BackendUnavailableError
from kvblocks.layout import KvBlockLayout, LayoutConfig
from kvblocks.models import lookup_model
from kvblocks.storage import PhysicalLayout, numa
from kvblocks.transfer import TransferManager, TransferPreferences

NUM_BLOCKS = 128
TOKENS_PER_BLOCK = 16


@dataclass(frozen=True)
class Row:
    gpu: str
    gpu_index: int
    gpu_node: str
    host_node: int
    path: str
    direction: str
    gbps: float
    os_gbps: float
    ratio: float


def _config() -> LayoutConfig:
    dims = lookup_model("llama-3.1-70b").dims(TOKENS_PER_BLOCK, torch.bfloat16)
    return LayoutConfig.from_dims(dims, NUM_BLOCKS)


def _pinned(config: LayoutConfig, node: int | None) -> PhysicalLayout:
    builder = PhysicalLayout.builder(config).fully_contiguous()
    return builder.kv_format(KvBlockLayout.UniversalTP).allocate_pinned(node).build()


def _device(config: LayoutConfig, gpu: int) -> PhysicalLayout:
    builder = PhysicalLayout.builder(config).layer_separate()
    return builder.kv_format(KvBlockLayout.OperationalNHD).allocate_device(gpu).build()


class Placement:
    """A pinned layout placed on one node (None: by the system), a device layout, a device
    buffer of the pinned layout's size, and the timed calls between them."""

    def __init__(self, manager: TransferManager, config: LayoutConfig, gpu: int, node) -> None:
        self.manager = manager
        self.pinned = manager.register_layout(_pinned(config, node))
        self.device = manager.register_layout(_device(config, gpu))
        host = manager.layout(self.pinned).allocations[0].view()
        scratch = torch.empty_like(host, device=f"cuda:{gpu}")
        torch.randint(0, 256, host.shape, dtype=torch.uint8, out=host)
        ids = list(range(NUM_BLOCKS))
        block = host[: config.block_bytes]
        first = block.clone()
        to_gpu = self._transfer(self.pinned, ids, self.device)
        to_host = self._transfer(self.device, ids, self.pinned)
        to_gpu()
        block.zero_()
        to_host()
        if not torch.equal(block, first):
            raise AssertionError(f"block 0 came back changed (host node {node})")
        self.nbytes = host.numel()
        self.calls = {
            ("transfer", "h2d"): to_gpu,
            ("transfer", "d2h"): to_host,
            ("bulk", "h2d"): lambda: scratch.copy_(host, non_blocking=True),
            ("bulk", "d2h"): lambda: host.copy_(scratch, non_blocking=True),
        }

    def _transfer(self, src, ids, dst):
        return lambda: self.manager.execute_transfer(src, ids, dst, ids).wait()

    def release(self) -> None:
        self.calls = {}
        for handle in (self.pinned, self.device):
            self.manager.release_layout(handle)


ROUTES = {
    "default": TransferPreferences(),
    "kernel": TransferPreferences(copy_engine_min_bytes=None, staged_min_bytes=None),
}


def run(gpus: list[int], iters: int) -> list[Row]:
    nodes = numa.online_nodes()
    config = _config()
    rows = []
    total, step = len(gpus) * len(ROUTES) * len(nodes), 0
    for gpu in gpus:
        torch.cuda.set_device(gpu)
        gpu_node = numa.gpu_node(gpu)
        name = torch.cuda.get_device_name(gpu)
        for route, prefs in ROUTES.items():
            with TransferManager.builder().cuda_device_id(gpu).preferences(prefs).build() as tm:
                system = Placement(tm, config, gpu, None)
                for node in nodes:
                    step += 1
                    progress(step, total, f"GPU {gpu} (node {gpu_node}), host node {node}, {route}")
                    placed = Placement(tm, config, gpu, node)
                    for (path, direction), call in placed.calls.items():
                        if path == "bulk" and route != "default":
                            continue
                        ms, os_ms = median_ms(call, system.calls[path, direction], iters=iters)
                        here, there = gbps(placed.nbytes, ms), gbps(placed.nbytes, os_ms)
                        rows.append(
                            Row(
                                name,
                                gpu,
                                "?" if gpu_node is None else str(gpu_node),
                                node,
                                path if path == "bulk" else f"transfer ({route})",
                                direction,
                                round(here, 2),
                                round(there, 2),
                                round(here / there, 3),
                            )
                        )
                    placed.release()
                system.release()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", help="GPU indices, comma-separated (default: all)")
    parser.add_argument("--iters", type=int, default=50, help="timed runs per case (median)")
    args = parser.parse_args(argv)
    try:
        require_gpu()
    except BackendUnavailableError as exc:
        print(f"numa.py: {exc}", file=sys.stderr)
        return 2
    nodes = numa.online_nodes()
    if len(nodes) < 2:
        listed = nodes or "none listed"
        print(f"NUMA nodes online here: {listed}; nothing to compare", file=sys.stderr)
        return 0
    count = torch.cuda.device_count()
    gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else list(range(count))
    write_csv(run(gpus, args.iters), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
