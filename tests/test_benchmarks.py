"""The benchmark suites: plots and reports from CSVs anywhere, the suites themselves on a GPU."""

import csv
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvblocks.benchmarks import (
    contention,
    kvbench,
    paged,
    peers,
    permute,
    pool,
    remote,
    sharing,
    transfers,
)
from kvblocks.benchmarks.timing import write_csv
from kvblocks.cli import main
from kvblocks.layout import KvDims
from kvblocks.remote import nixl_available

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_without_gpu_says_so(capsys):
    assert main(["bench", "permute"]) == 2
    assert "benchmarks need a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["bench", "--from-csv", "x.csv"], "--from-csv needs --plot"),
        (["bench", "--from-csv", "{tmp}/none.csv", "--plot", "x.png"], "--from-csv names no file"),
        (["bench", "pool", "--plot", "x.png"], "--plot needs --csv"),
        (["bench", "pool", "--csv", "{tmp}/no/x.csv"], "--csv is in a folder that does not exist"),
        (["bench", "pool", "--csv", "{tmp}"], "--csv names a folder, not a file"),
        (["bench", "--directions", "h2d,sideways"], "--directions must be a comma-separated"),
    ],
)
def test_bench_argument_errors(capsys, tmp_path, args, message):
    """Bad arguments stop the command before any benchmark runs (the pool suite would run on
    this CPU), with status 2 and nothing on stdout."""
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
@pytest.mark.parametrize(
    "suite",
    [
        "kvbench",
        "permute",
        "paged",
        "transfers",
        "contention",
        "disk",
        "remote",
        "sharing",
        "peers",
        "pool",
    ],
)
def test_plot_from_recorded_csv(tmp_path, suite):
    png = tmp_path / f"{suite}.png"
    assert (
        main(["bench", suite, "--from-csv", str(RESULTS / f"{suite}.csv"), "--plot", str(png)]) == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
@pytest.mark.parametrize(
    "text,message", [("a,b\n", "holds no rows"), ("case,speed\nx,1\n", "has none of the columns")]
)
def test_plot_of_a_csv_it_cannot_draw(capsys, tmp_path, text, message):
    (tmp_path / "odd.csv").write_text(text)
    args = ["bench", "--from-csv", str(tmp_path / "odd.csv"), "--plot", str(tmp_path / "x.png")]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_report_renders_recorded_results():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "report.py"), str(RESULTS)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "universal_from_block/NHD" in proc.stdout
    assert proc.stdout.count("\n| 16 | 128 |") >= 9  # every kvbench case at 128 blocks


def test_recorded_results_are_complete():
    with open(RESULTS / "permute.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(permute.CONVERSIONS) * 6
    with open(RESULTS / "kvbench.csv") as f:
        rows = list(csv.DictReader(f))
    cases = len(kvbench.DIRECTIONS) * (len(kvbench.BACKENDS) - 1) + 1  # staged: h2d only
    assert len(rows) == 2 * 2 * len(kvbench.PATTERNS) * cases


def test_write_csv_header_and_rows():
    out = io.StringIO()
    write_csv([paged.PagedRow("copy_blocks", 2, 4, 64, 512, 0.1, 5.0, 10.0, 1.0, 6.0, 0.8)], out)
    header, row = out.getvalue().splitlines()
    assert header.startswith("op,num_layers,pairs") and row.startswith("copy_blocks,2,4")


@pytest.mark.gpu
def test_suites_run_small():
    small = KvDims(nl=2, no=2, nh=2, nt=16, hd=64, dtype="bf16")
    rows = kvbench.run(
        lambda nt: small,
        [16],
        [1, 3],
        ["lw_to_fc"],
        ["h2d", "d2d"],
        ["kernel", "memcpy_batch", "staged"],
        warmup=1,
        iters=3,
    )
    assert len(rows) == 1 * 2 * 1 * (2 * 2 + 1) and all(r.bandwidth_gbps > 0 for r in rows)
    assert [r.direction for r in rows if r.backend == "staged"] == ["h2d", "h2d"]
    rows = permute.run(nl=2, hd=64, nt_values=[16], nh_values=[2], nb=4, warmup=1, iters=3)
    assert len(rows) == len(permute.CONVERSIONS)
    rows = paged.run(small, pairs=8, warmup=1, iters=3)
    assert [r.op for r in rows] == [c.name for c in paged.CASES]
    assert all(r.bandwidth_gbps > 0 for r in rows)


@pytest.mark.gpu
def test_transfer_suites_run_small(tmp_path):
    # 128 KiB blocks: GB/s are rounded to 2 decimals, and a block of a few KiB timed on a busy
    # machine (1 ms or more) could round to 0.
    small = KvDims(nl=2, no=2, nh=8, nt=16, hd=128, dtype="bf16")
    rows = transfers.run_manager(lambda nt: small, [16], [1, 4], warmup=1, iters=3)
    assert len(rows) == 12 and all(r.manager_gbps > 0 and r.call_us > 0 for r in rows), rows
    assert {r.pattern for r in rows} == {"lw_to_fc", "fc_to_lw", "os_to_fc", "fc_to_os", "fc_to_fc"}
    assert {r.strategy for r in rows} == {"kernel"}, rows  # a few KiB: below the copy engine's
    assert {r.pinned_ids for r in rows} == {"consecutive"}
    rows = transfers.run_manager(lambda nt: small, [16], [4], warmup=1, iters=3, scattered=True)
    assert len(rows) == 6 and {r.pinned_ids for r in rows} == {"scattered"}, rows  # moved right
    rows = transfers.run_disk(lambda nt: small, [16], [4], folder=str(tmp_path), repeats=1)
    assert [r.direction for r in rows] == ["pinned_to_disk", "disk_to_pinned"]


@pytest.mark.gpu
def test_contention_suite_runs_small():
    """Each route takes its path, and the transfer and the work are timed alone and together."""
    small = KvDims(nl=2, no=2, nh=2, nt=16, hd=64, dtype="bf16")
    rows = contention.run(lambda nt: small, [16], [2], iters=2)
    assert [(r.route, r.host_format, r.direction, r.work.split()[0]) for r in rows] == [
        (route, fmt.name, direction, work)
        for route in contention.ROUTES
        for fmt in contention.HOST_FORMATS
        for direction in ("h2d", "d2h")
        for work in contention.WORKS
    ]
    assert {(r.route, r.strategy) for r in rows} == {("kernel", "kernel"), ("staged", "staged")}
    for r in rows:
        assert r.transfer_alone_gbps > 0 and r.transfer_shared_gbps > 0 and r.work_alone_ms > 0
        assert r.both_ms >= r.work_shared_ms


@pytest.mark.gpu
@pytest.mark.skipif(not nixl_available(), reason="needs NIXL")
def test_remote_suite_runs_small():
    small = KvDims(nl=2, no=2, nh=2, nt=16, hd=64, dtype="bf16")
    rows = remote.run(lambda nt: small, [16], [1, 4], warmup=1, iters=2)
    assert len(rows) == 2 * 2 * len(remote.ROUTES)
    assert {(r.route, r.strategy) for r in rows} == {("direct", "nixl"), ("staged", "nixl_bounce")}
    assert all(r.nixl_gbps > 0 and r.local_gbps > 0 for r in rows)


@pytest.mark.skipif(not nixl_available(), reason="needs NIXL")
def test_sharing_suite_runs_small():
    pytest.importorskip("zmq")
    small = KvDims(nl=2, no=2, nh=2, nt=4, hd=16, dtype="bf16")
    rows = sharing.run(lambda nt: small, [4], [1, 3], warmup=1, iters=2)
    assert [(r.num_blocks, r.total_bytes) for r in rows] == [(1, 1024), (3, 3072)]
    assert all(r.peer_lookup_ms > r.peer_read_ms > 0 and r.nixl_alone_ms > 0 for r in rows)
    assert all(r.peer_write_ms > 0 and r.nixl_alone_write_ms > 0 for r in rows)


@pytest.mark.skipif(not nixl_available(), reason="needs NIXL")
def test_peers_suite_runs_small():
    """Every peer is asked on every lookup without news; with news none is asked for a prompt
    no peer caches and one for a prompt one peer caches."""
    pytest.importorskip("zmq")
    small = KvDims(nl=2, no=2, nh=2, nt=4, hd=16, dtype="bf16")
    rows = peers.run(lambda nt: small, 4, 3, peers=[1, 2], warmup=1, iters=3)
    assert [(r.peers, r.case, r.num_blocks) for r in rows] == [
        (p, case, 3) for p in (1, 2) for case in ("miss", "hit")
    ]
    for r in rows:
        assert r.ask_all_requests == r.peers
        assert r.news_requests == (r.case == "hit")
        assert r.ask_all_ms > 0 and r.news_ms > 0


def test_pool_suite_runs_on_the_cpu(capsys):
    rows = pool.run(block_size=4, sequence_blocks=50, batch=8, repeats=3)
    assert [r.operation for r in rows][0] == "allocate+free (batch 8)"
    assert [r.operation for r in rows][-3:] == [
        "KvIndex.apply",
        "KvIndex.overlaps_of (1 worker)",
        "KvIndex.overlaps_of (8 workers)",
    ]
    assert all(r.blocks_per_second > 0 and r.blocks == 50 for r in rows[1:])


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("strided", [True, False])
@pytest.mark.parametrize("programs", [1, 3, 8])
def test_h2d_limits_probe_kernel_copies_every_pair(strided, programs):
    """bench/h2d_limits.py's persistent copy (run on the CPU by Triton's interpreter)."""
    h2d_limits = _bench_module("h2d_limits")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    src = torch.randint(0, 256, (5, 4096), dtype=torch.uint8, device=device)
    dst = torch.full_like(src, 0xFF)
    order = [3, 0, 4, 1, 2]
    src_table = torch.tensor([src[i].data_ptr() for i in range(5)], device=device)
    dst_table = torch.tensor([dst[j].data_ptr() for j in order], device=device)
    h2d_limits.persistent_copy(src_table, dst_table, 4096, 1024, programs, strided)
    for i, j in enumerate(order):
        assert torch.equal(dst[j], src[i])


@pytest.mark.gpu
def test_launch_cost_script_checks_each_way_and_times_it():
    """bench/launch_cost.py: every way of launching moves the bytes right (it asserts so before
    timing), then one line of four times per round."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "launch_cost.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("# ") and len(lines) == 4
    for line in lines[1:]:
        times = [float(w) for w in line.split() if w.replace(".", "").isdigit()]
        assert len(times) == 4 and all(t > 0 for t in times), line


def bench_rows(script: str, args: list[str]) -> list[dict[str, str]]:
    """The CSV rows that ``bench/<script> <args>`` writes, once it has exited with 0."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return list(csv.DictReader(io.StringIO(proc.stdout)))


def test_ttft_script_times_every_source_and_checks_what_came_back(tmp_path):
    """bench/ttft.py with the example's small model: a row per prompt length and source,
    each hit's blocks checked against the recompute's (it raises otherwise); with NIXL, the
    peer's rows too (``--peer``)."""
    peer = nixl_available()
    rows = bench_rows(
        "ttft.py",
        ["--model", "small", "--prompt-tokens", "64,96", "--repeats", "1"]
        + ["--offload-path", str(tmp_path)]
        + ["--peer"] * peer,
    )
    sources = ("recompute", "G1", "G2", "G3", "G3 or compute", "G3 split")
    sources += ("G4", "G4 split", "G3+G4", "G3+G4 split") if peer else ()
    assert [(r["prompt_tokens"], r["source"]) for r in rows] == [
        (n, s) for n in ("64", "96") for s in sources
    ]
    for row in rows:
        prefix = int(row["prompt_tokens"]) - 16
        cached = {
            "recompute": {0},
            "G3 or compute": {0, prefix},
            "G3 split": set(range(0, prefix + 1, 16)),  # the tokens read
            "G4 split": set(range(0, prefix + 1, 16)),
            "G3+G4 split": set(range(0, prefix + 1, 16)),
        }.get(row["source"], {prefix})
        assert int(row["cached_tokens"]) in cached
        assert float(row["ttft_ms"]) > 0 and float(row["speedup"]) > 0
        for column, tier in (("disk_gbps", "G3"), ("peer_gbps", "G4")):
            if tier not in row["source"]:
                assert not row[column], row
            elif row[column] or tokens_read(row, tier):
                assert float(row[column]) > 0, row
    assert not list(tmp_path.iterdir())  # the G3 files went with their folder


def tokens_read(row: dict[str, str], tier: str) -> int:
    """The tokens that the timed request of a bench/ttft.py row read from ``tier``: all it
    had cached, but where a split starts reading past the first half (the G3 part) of a
    prompt cached half on the disk and half at the peer."""
    cached = int(row["cached_tokens"])
    if row["source"] == "G3+G4 split" and tier == "G3":
        prefix = int(row["prompt_tokens"]) - 16
        return max(0, cached - (prefix - prefix // 16 // 2 * 16))
    return cached


def test_gil_script_times_lookups_beside_a_python_loop(tmp_path):
    """bench/gil.py with a tiny cache: a row per source (G2, G3 after a restart), switch
    interval and neighbour, each hit's blocks checked (it raises otherwise); with NIXL, the
    peer's rows too. The G3 file goes with its folder."""
    peer = nixl_available()
    rows = bench_rows(
        "gil.py",
        ["--layers", "2", "--blocks", "4", "--repeats", "1", "--offload-path", str(tmp_path)]
        + ["--peer"] * peer,
    )
    sources = ("G2", "G3", "G4") if peer else ("G2", "G3")
    assert [(r["source"], r["switch_ms"], r["beside"]) for r in rows] == [
        (s, ms, b) for s in sources for ms in ("5.0", "0.5") for b in ("nothing", "python_loop")
    ]
    for row in rows:
        assert float(row["lookup_ms"]) >= float(row["copy_ms"]) > 0, row
        if row["source"] == "G2":
            assert not row["read_ms"], row
        else:
            assert float(row["lookup_ms"]) >= float(row["read_ms"]) > 0, row
        assert (row["beside"] == "nothing") == (row["slowdown"] == "1.0"), row
    assert not list(tmp_path.iterdir())


def test_ttft_script_says_that_peer_needs_nixl(monkeypatch, capsys):
    ttft = _bench_module("ttft")
    monkeypatch.setattr(ttft, "nixl_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        ttft.main(["--model", "small", "--peer"])
    assert exit_.value.code == 2
    assert "--peer reads through NIXL, which is not installed" in capsys.readouterr().err


def test_ttft_fingerprints_find_any_changed_block_and_layer(tmp_path):
    """bench/ttft.py's check of a hit: a word changed in any block of the prefix, in any
    layer's K or V, is found, from the position it is told to start at."""
    from kvblocks.pool import BlockManager
    from tests.test_manager import make_config

    ttft = _bench_module("ttft")
    with BlockManager(make_config(tmp_path, g1=8, g2=0, g3=0)) as manager:
        blocks = manager.allocate(5)
        for cache in manager.device_tensors:
            cache[blocks] = torch.randn(5, *cache.shape[1:], device=cache.device).to(cache.dtype)
        prints = ttft.Fingerprints(manager, blocks, 4)  # the last block is not of the prefix
        prints.check(manager, blocks, "G1")
        manager.device_tensors[0][blocks[4]] += 1
        prints.check(manager, blocks, "G1")
        manager.region_view(1, 1)[blocks[2]].view(-1)[7] += 1  # one element of layer 1's V
        with pytest.raises(RuntimeError, match="1 block.*position 2"):
            prints.check(manager, blocks, "G1")
        prints.check(manager, blocks, "G1", first=3)


def test_prefetch_script_serves_a_g3_prompt_every_way_between_decoding_steps(tmp_path):
    """bench/prefetch.py with the example's small model: a row per mode, each hit's blocks
    checked against the computed ones (it raises otherwise); only a prefetch lets the decoding
    request step while the disk is read."""
    modes = bench_rows(
        "prefetch.py",
        ["--model", "small", "--prompt-tokens", "128", "--repeats", "1", "--decode-context", "32"]
        + ["--offload-path", str(tmp_path)],
    )
    rows = {r["mode"]: r for r in modes}
    assert list(rows) == ["compute", "lookup", "prefetch", "prefetch_overlap", "split"]
    for mode, row in rows.items():
        assert float(row["ttft_ms"]) > 0 and float(row["stall_ms"]) > 0, row
        assert float(row["base_step_ms"]) > 0
        if mode == "split":  # as much read as the rates say: from nothing to all of it
            assert float(row["prefix_mib"]) >= 0 and float(row["disk_gbps"]) >= 0
            continue
        assert (float(row["prefix_mib"]) > 0) == (mode != "compute")
        assert (float(row["disk_gbps"]) > 0) if mode != "compute" else not row["disk_gbps"]
        if not mode.startswith("prefetch"):  # on this CPU a prefetch may end within a step
            assert int(row["steps_during"]) == 0 and not row["step_ms"], row
    assert not list(tmp_path.iterdir())


def test_disk_ceiling_script_reads_and_writes_every_combination(tmp_path):
    """bench/disk_ceiling.py: a row per (threads, I/O size) read and per thread count written,
    each a positive rate; its scratch file goes; a missing folder is refused by name."""
    script = [sys.executable, str(ROOT / "bench" / "disk_ceiling.py")]
    small = ["--mib", "4", "--threads", "1,3", "--io-mib", "1,2"]
    proc = subprocess.run(script + [str(tmp_path)] + small, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    expected = [("read", t, s) for s in ("1", "2") for t in ("1", "3")]
    expected += [("write", t, "8") for t in ("1", "3")]
    assert [(r["op"], r["threads"], r["io_mib"]) for r in rows] == expected
    assert all(float(r["gbps"]) > 0 for r in rows)
    assert not list(tmp_path.iterdir())

    missing = subprocess.run(script + [str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "nope' is not a folder" in missing.stderr
