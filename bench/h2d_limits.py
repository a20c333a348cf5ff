"""What bounds zero-copy h2d: kernels reading pinned host memory, against the copy engine.

Times host -> device copies of 128 blocks of Llama-3.1-70B (16 tokens per block: 20,480
regions of 32 KiB, 640 MiB) issued by the GPU's SMs in several ways, each interleaved with one
bulk pinned copy of the same bytes (the copy engine) so both see the same clocks and link:

- ``shipped``: :func:`kvblocks.kernels.plan_copy`, pairs in the layout's order
  (block, layer, outer);
- ``src-sorted``: the same kernel, pairs sorted by source address (reads walk host memory in
  order);
- ``persistent``: :func:`_persistent_copy`, a fixed grid of ``programs`` programs (from an
  eighth of the SMs to eight per SM) looping over the chunks, either strided (program ``p``
  takes chunks ``p, p + G, ...``, so chunks in flight are neighbours in the table) or each a
  contiguous range; 16 and 32 KiB chunks;
- ``pages``: the shipped kernel copying one contiguous 640 MiB host buffer in 32 KiB pairs,
  from ``cudaHostAlloc`` memory, from write-combined ``cudaHostAlloc`` memory (which PCIe
  reads without snooping the CPU's caches; needs cuda-bindings) and from memory in 2 MiB pages
  (transparent huge pages, registered with ``cudaHostRegister``), each against its own bulk
  copy.

If the SMs' reads were limited by how many are in flight, by the order they touch host pages
or by how many pages they touch (address translation), some variant would move more; a ratio
to the bulk copy that stays put across all of them points at the reads themselves. Every
variant's result is checked before it is reported.

CSV on stdout: gpu, pattern, variant, programs, chunk_bytes, kernel_gbps, bulk_gbps, ratio.
Usage: python bench/h2d_limits.py > h2d-limits.csv   (needs a CUDA GPU)
"""

import ctypes
import functools
import mmap
import sys

import torch

from kvblocks.benchmarks.kvbench import _check_sample, _pairs, _Side
from kvblocks.benchmarks.timing import gbps, gpu_name, median_ms, require_gpu
from kvblocks.kernels import plan_copy
from kvblocks.kernels._triton import tl, triton
from kvblocks.models import lookup_model

NUM_BLOCKS = 128
CHUNKS = (16384, 32768)
PROGRAMS_PER_SM = (0.125, 0.5, 1, 2, 4, 8)
HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


@triton.jit
def _persistent_copy(
    src_table,
    dst_table,
    num_chunks,
    CHUNK: tl.constexpr,
    CHUNKS_PER_PAIR: tl.constexpr,
    PROGRAMS: tl.constexpr,
    STRIDED: tl.constexpr,
):
    """Copy ``num_chunks`` chunks of ``CHUNK`` 32-bit words; pair ``i`` is chunks
    ``[i * CHUNKS_PER_PAIR, (i + 1) * CHUNKS_PER_PAIR)``, at ``src_table[i]`` -> ``dst_table[i]``
    (16-byte aligned addresses)."""
    pid = tl.program_id(0)
    if STRIDED:
        first, last, step = pid, num_chunks, PROGRAMS
    else:
        per_program = tl.cdiv(num_chunks, PROGRAMS)
        first, step = pid * per_program, 1
        last = tl.minimum(first + per_program, num_chunks)
    for c in range(first, last, step):
        pair = c // CHUNKS_PER_PAIR
        src = tl.load(src_table + pair).to(tl.pointer_type(tl.int32))
        dst = tl.load(dst_table + pair).to(tl.pointer_type(tl.int32))
        offs = (c % CHUNKS_PER_PAIR) * CHUNK + tl.arange(0, CHUNK)
        src, dst = tl.multiple_of(src, 16), tl.multiple_of(dst, 16)
        tl.store(dst + offs, tl.load(src + offs))


def persistent_copy(
    src: torch.Tensor, dst: torch.Tensor, size: int, chunk_bytes: int, programs: int, strided: bool
) -> None:
    """Launch :func:`_persistent_copy` over device tables ``src`` / ``dst`` of ``size``-byte
    pairs (``size`` a multiple of ``chunk_bytes``)."""
    per_pair = size // chunk_bytes
    _persistent_copy[(programs,)](
        src,
        dst,
        src.numel() * per_pair,
        CHUNK=chunk_bytes // 4,
        CHUNKS_PER_PAIR=per_pair,
        PROGRAMS=programs,
        STRIDED=strided,
        num_warps=8,
    )


def _anon_huge_bytes() -> int:
    with open("/proc/meminfo") as f:
        line = next(line for line in f if line.startswith("AnonHugePages:"))
    return int(line.split()[1]) * 1024


def huge_page_host(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of random host bytes in 2 MiB pages, registered with CUDA as pinned memory
    (the tensor keeps its mapping alive), or None, saying why on stderr, where this Linux gives
    no transparent huge pages."""
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    host = raw[start : start + nbytes]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    before = _anon_huge_bytes()
    if libc.madvise(host.data_ptr(), nbytes, MADV_HUGEPAGE) != 0:
        print(f"no huge pages: madvise errno {ctypes.get_errno()}", file=sys.stderr)
        return None
    host.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    if _anon_huge_bytes() - before < nbytes // 2:
        print("no huge pages: the kernel backed the buffer with small pages", file=sys.stderr)
        return None
    status = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, 0)
    if status != torch.cuda.cudart().cudaError.success:
        print(f"no huge pages: cudaHostRegister said {status}", file=sys.stderr)
        return None
    return host


def write_combined_host(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of random host bytes in write-combined pinned memory (free it with
    ``cudaFreeHost``), or None, saying why on stderr, without cuda-bindings."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        print("no write-combined memory: cuda-bindings is not installed", file=sys.stderr)
        return None
    err, ptr = runtime.cudaHostAlloc(nbytes, runtime.cudaHostAllocWriteCombined)
    if err != runtime.cudaError_t.cudaSuccess:
        print(f"no write-combined memory: cudaHostAlloc said {err}", file=sys.stderr)
        return None
    host = torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=torch.uint8)
    host.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    return host


def out(*fields) -> None:
    print(",".join(str(f) for f in fields), flush=True)


def out_row(gpu, pattern, variant, programs, chunk, nbytes: int, ms: float, bulk_ms: float):
    """One CSV row: ``nbytes`` moved in ``ms`` by the variant and ``bulk_ms`` by the bulk copy."""
    kernel_bw, bulk_bw = gbps(nbytes, ms), gbps(nbytes, bulk_ms)
    ratio = round(kernel_bw / bulk_bw, 4)
    out(gpu, pattern, variant, programs, chunk, round(kernel_bw, 2), round(bulk_bw, 2), ratio)


def main() -> None:
    device = require_gpu()
    gpu = gpu_name()
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    dims = lookup_model("llama-3.1-70b").dims(16)
    host, dev = _Side(dims, NUM_BLOCKS, "pinned"), _Side(dims, NUM_BLOCKS, "device")
    nbytes = NUM_BLOCKS * dims.block_bytes
    bulk_src, bulk_dst = host.fc_tensor[:nbytes], dev.fc_tensor[:nbytes]

    def bulk():
        bulk_dst.copy_(bulk_src, non_blocking=True)

    def report(pattern, variant, programs, chunk, fn, src_table, dst_table, size):
        ms, bulk_ms = median_ms(fn, bulk, iters=50)
        dev.fc_tensor.zero_()
        for t in dev.lw_tensors:
            t.zero_()
        fn()
        torch.cuda.synchronize()
        _check_sample(host, dev, src_table, dst_table, size)
        out_row(gpu, pattern, variant, programs, chunk, nbytes, ms, bulk_ms)

    out("gpu", "pattern", "variant", "programs", "chunk_bytes", "kernel_gbps", "bulk_gbps", "ratio")
    for pattern in ("lw_to_fc", "fc_to_lw"):
        src_list, dst_list, size = _pairs(pattern, host, dev, list(range(NUM_BLOCKS)))
        src, dst = torch.tensor(src_list), torch.tensor(dst_list)
        order = torch.argsort(src)
        for variant, (s, d) in (("shipped", (src, dst)), ("src-sorted", (src[order], dst[order]))):
            plan = plan_copy(s, d, size, device)
            report(pattern, variant, "-", "-", plan.run, s.tolist(), d.tolist(), size)
        s, d = src.to(device), dst.to(device)
        for chunk in CHUNKS:
            for strided in (True, False):
                for programs in (max(1, round(k * sms)) for k in PROGRAMS_PER_SM):
                    variant = "persistent-" + ("strided" if strided else "ranges")
                    fn = functools.partial(persistent_copy, s, d, size, chunk, programs, strided)
                    report(pattern, variant, programs, chunk, fn, src_list, dst_list, size)
                    print(f"{pattern} {variant} {programs} {chunk}", file=sys.stderr)
    _pages(gpu, device, nbytes)


def _pages(gpu: str, device: torch.device, nbytes: int) -> None:
    """The ``pages`` rows: one contiguous host buffer copied in 32 KiB pairs by the shipped
    kernel, from cudaHostAlloc memory, write-combined memory and 2 MiB pages."""
    chunk = CHUNKS[-1]
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    pinned = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).pin_memory()
    hosts = {"cudaHostAlloc": pinned}
    write_combined = write_combined_host(nbytes)
    if write_combined is not None:
        hosts["write-combined"] = write_combined
    huge = huge_page_host(nbytes)
    if huge is not None:
        hosts["2MiB-pages"] = huge
    offsets = torch.arange(0, nbytes, chunk)
    for variant, host in hosts.items():
        plan = plan_copy(host.data_ptr() + offsets, dst.data_ptr() + offsets, chunk, device)

        def bulk(host=host):
            dst.copy_(host, non_blocking=True)

        ms, bulk_ms = median_ms(plan.run, bulk, iters=50)
        dst.zero_()
        plan.run()
        if not torch.equal(dst.cpu(), host):
            raise AssertionError(f"pages {variant}: the copy differs from its source")
        out_row(gpu, "pages", variant, "-", chunk, nbytes, ms, bulk_ms)
        print(f"pages {variant}", file=sys.stderr)
    if huge is not None:
        torch.cuda.cudart().cudaHostUnregister(huge.data_ptr())
    if write_combined is not None:
        from cuda.bindings import runtime

        runtime.cudaFreeHost(write_combined.data_ptr())


if __name__ == "__main__":
    main()
