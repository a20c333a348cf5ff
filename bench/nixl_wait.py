"""Idle CPU and transfer latency of NIXL agents whose progress thread spins (``wait 0``, what
NIXL's Python API asks for) or waits for messages (``wait 1000``, what kvblocks asks for).

Two agents in this process; median time of one READ and one WRITE of a buffer between them
(host memory, and GPU memory where there is a GPU), then the CPU the two use while idle for
0.5 s. Each setting runs twice, alternating. Usage: ``python bench/nixl_wait.py`` (prints CSV).
"""

import csv
import statistics
import sys
import time
import uuid

import torch

from kvblocks.benchmarks.timing import cpu_name, gpu_name
from kvblocks.layout import MemoryRegion
from kvblocks.remote import nixl

SIZES = (16 << 10, 5 << 20)


def measure(wait_us: int, nbytes: int, on_gpu: bool, iters: int) -> dict:
    nixl.PROGRESS_WAIT_US = wait_us
    nixl._waiting_agent.cache_clear()
    here = nixl.NixlAgent(f"here-{uuid.uuid4().hex[:6]}", ["UCX"])
    there = nixl.NixlAgent(f"there-{uuid.uuid4().hex[:6]}", ["UCX"])
    device = "cuda" if on_gpu else "cpu"
    pinned = torch.cuda.is_available() and not on_gpu
    a = torch.zeros(nbytes, dtype=torch.uint8, device=device, pin_memory=pinned)
    b = torch.ones(nbytes, dtype=torch.uint8, device=device, pin_memory=pinned)
    kind = nixl.MemKind.VRAM if on_gpu else nixl.MemKind.DRAM
    here.register([MemoryRegion(a.data_ptr(), nbytes)], kind, 0)
    theirs = there.register([MemoryRegion(b.data_ptr(), nbytes)], kind, 0)
    target = nixl.RemoteMemory(there.name, kind, 0)
    region = [MemoryRegion(b.data_ptr(), nbytes)]
    here.connect(there.name, "b", target, region, there.metadata(theirs))
    row = {"memory": kind.value, "bytes": nbytes, "wait_us": wait_us}
    mine, remote = [(a.data_ptr(), nbytes, 0)], [(b.data_ptr(), nbytes, 0)]
    for op in (nixl.NixlOp.READ, nixl.NixlOp.WRITE):
        times = []
        for i in range(iters + 10):
            start = time.perf_counter()
            here.transfer(op, mine, kind, remote, target)
            if i >= 10:
                times.append(time.perf_counter() - start)
        row[f"{op.value.lower()}_us"] = round(statistics.median(times) * 1e6, 1)
    cpu, wall = time.process_time(), time.perf_counter()
    time.sleep(0.5)
    row["idle_cpu_cores"] = round((time.process_time() - cpu) / (time.perf_counter() - wall), 2)
    here.close()
    there.close()
    return row


def main() -> None:
    print(f"# NIXL agents on {gpu_name()} / {cpu_name()}", file=sys.stderr)
    rows = []
    for on_gpu in (False, True) if torch.cuda.is_available() else (False,):
        for nbytes in SIZES:
            for wait_us in (0, 1000, 0, 1000):
                rows.append(measure(wait_us, nbytes, on_gpu, 100 if nbytes > 1 << 20 else 300))
    writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


if __name__ == "__main__":
    main()
