"""The demo: its workload, its checks of hit blocks, and the ``kvblocks demo`` command."""

import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from kvblocks.cli import main
from kvblocks.demo import ChatWorkload, count_mismatches, write_pattern
from kvblocks.errors import InvalidArgumentError
from kvblocks.remote import nixl_available

SMALL = [
    *("--layers", "2", "--kv-heads", "2", "--head-dim", "16"),
    *("--conversations", "6", "--turns", "3", "--system-prompts", "2", "--system-tokens", "64"),
]
BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 2


def test_workload_is_seeded_and_keeps_turn_order():
    workload = ChatWorkload(conversations=5, turns=4, system_prompts=2, seed=3)
    first, again = workload.requests(), workload.requests()
    assert first == again and first != ChatWorkload(conversations=5, turns=4, seed=4).requests()
    assert len(first) == 20
    for c in range(5):
        turns = [t for t in first if t.conversation == c]
        assert [t.turn for t in turns] == [0, 1, 2, 3]
        assert len(turns[0].system) == 512 and all(not t.system for t in turns[1:])
    systems = {tuple(t.system) for t in first if t.system}
    assert len(systems) <= 2  # conversations share the system prompts
    with pytest.raises(InvalidArgumentError, match="user_tokens"):
        ChatWorkload(user_tokens=(10, 5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.uint8], ids=str)
def test_pattern_check_catches_a_changed_element(dtype):
    regions = [torch.full((6, 4, 2, 8), 255, dtype=torch.uint8).view(dtype) for _ in range(6)]
    hashes = [2**64 - 1, 12345, 99]
    write_pattern(regions, [1, 4, 5], hashes)
    assert count_mismatches(regions, [1, 4, 5], hashes) == 0
    assert count_mismatches(regions, [4, 1, 5], hashes) == 2  # swapped blocks
    regions[5].view(torch.uint8)[5, 3, 1, 7] ^= 1
    assert count_mismatches(regions, [1, 4, 5], hashes) == 1
    assert not torch.equal(regions[0][1], regions[1][1])  # each region of a block differs


def test_demo_hits_every_tier_and_saves_prefill(capsys, tmp_path):
    plot = tmp_path / "demo.png"
    args = ["demo", *SMALL, "--g1-blocks", "80", "--g2-blocks", "60", "--json", "--quiet"]
    assert main([*args, "--plot", str(plot)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["requests"] == 18
    assert result["hits"]["G1"] > 0 and result["hits"]["G2"] > 0 and result["hits"]["G3"] > 0
    assert result["verified_blocks"] == sum(result["hits"].values())
    assert 0 < result["saved_tokens"] < result["prompt_tokens"]
    moved = {(m["kind"], m["src"], m["dst"]): m for m in result["moved"]}
    assert moved[("offload", "G1", "G2")]["blocks"] > 0
    assert (
        moved[("onboard", "G3", "G2")]["bytes"]
        == moved[("onboard", "G3", "G2")]["blocks"] * BLOCK_BYTES
    )
    assert plot.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("layout", "fmt", "more"),
    [
        ("outer-first", "hnd", []),
        ("outer-separate", "nhd", []),
        ("fully-contiguous", "nhd", []),
        ("outer-first", "nhd", ["--dtype", "fp8_e4m3"]),
        ("block-first", "nhd", ["--dtype", "u8", "--outer", "1", "--kv-heads", "1"]),  # MLA
    ],
)
def test_demo_verifies_hits_in_other_device_layouts_and_dtypes(capsys, layout, fmt, more):
    args = ["demo", *SMALL, "--g1-blocks", "80", "--g2-blocks", "60", "--json", "--quiet"]
    assert main([*args, "--device-layout", layout, "--device-format", fmt, *more]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["hits"]["G2"] > 0 and result["hits"]["G3"] > 0
    assert result["verified_blocks"] == sum(result["hits"].values())


@pytest.mark.skipif(
    not nixl_available() or importlib.util.find_spec("zmq") is None,
    reason="workers share blocks through NIXL and ZMQ",
)
@pytest.mark.parametrize("news", [False, True])
def test_demo_with_two_workers_hits_the_other_ones_blocks(capsys, tmp_path, news):
    plot = tmp_path / "demo.png"
    args = ["demo", *SMALL, "--workers", "2", "--g1-blocks", "80", "--g2-blocks", "60"]
    args += ["--peer-news"] if news else []
    assert main([*args, "--json", "--quiet", "--plot", str(plot)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["requests"] == 18 and result["hits"]["G4"] > 0
    assert result["peer_requests"] > 0
    assert (result["peer_requests_spared"] > 0) == news
    assert result["verified_blocks"] == sum(result["hits"].values())
    moved = {(m["kind"], m["src"], m["dst"]): m for m in result["moved"]}
    assert moved[("onboard", "G4", "G2")]["blocks"] == result["hits"]["G4"]
    assert plot.stat().st_size > 10_000


@pytest.mark.skipif(
    not nixl_available() or importlib.util.find_spec("zmq") is None,
    reason="workers share blocks through NIXL and ZMQ",
)
def test_prefix_routing_keeps_conversations_where_their_blocks_are(capsys):
    """Three workers: routed by their KV events, requests find more of their prefixes
    locally (fewer G4 hits, more G1 hits, more prefill saved) and the workers share the load."""
    args = ["demo", *SMALL, "--workers", "3", "--g1-blocks", "80", "--g2-blocks", "60"]
    results = {}
    for route in ("round-robin", "prefix"):
        assert main([*args, "--route", route, "--json", "--quiet"]) == 0
        results[route] = json.loads(capsys.readouterr().out)
    plain, routed = results["round-robin"], results["prefix"]
    assert routed["hits"]["G4"] < plain["hits"]["G4"] / 2
    assert routed["hits"]["G1"] > plain["hits"]["G1"]
    assert routed["saved_tokens"] > plain["saved_tokens"]
    assert routed["verified_blocks"] == sum(routed["hits"].values())
    assert plain["worker_requests"] == [6, 6, 6]
    assert sum(routed["worker_requests"]) == 18 and min(routed["worker_requests"]) >= 3


def test_prefix_router_picks_the_longest_prefix_then_the_faster_tier_then_the_idler():
    from kvblocks.demo import PrefixRouter
    from kvblocks.pool import BlockStored, EventBatch, KvIndex, Tier, sequence_hashes

    index = KvIndex(4)
    router = PrefixRouter(index, 3)
    name = router.worker_name
    prompt = list(range(16))
    hashes = tuple(sequence_hashes(prompt, 4))

    def stored(worker, n, tier):
        event = BlockStored(hashes[:n], None, tuple(prompt[: 4 * n]), 4, tier)
        index.apply(name(worker), EventBatch(0.0, (event,)))

    assert [router.pick([7] * 8) for _ in range(4)] == [0, 1, 2, 0]  # nothing cached: idlest
    stored(1, 2, Tier.G2)
    stored(2, 2, Tier.G1)
    assert router.pick(prompt) == 2  # as long, in a faster tier
    stored(0, 3, Tier.G3)
    assert router.sent == [2, 1, 2]
    assert router.pick(prompt) == 1  # 1 block more on worker 0 is not worth 4 of balance
    stored(0, 4, Tier.G3)
    assert router.pick(prompt) == 0  # loads equal again: the longest prefix


def test_demo_writes_fewer_blocks_to_disk_with_a_disk_filter(capsys):
    args = ["demo", *SMALL, "--g1-blocks", "80", "--g2-blocks", "60", "--json", "--quiet"]
    written = []
    for uses in ("1", "2"):
        assert main([*args, "--disk-min-uses", uses]) == 0
        result = json.loads(capsys.readouterr().out)
        moved = {(m["kind"], m["src"], m["dst"]): m["blocks"] for m in result["moved"]}
        written.append(moved[("offload", "G2", "G3")])
        assert result["verified_blocks"] == sum(result["hits"].values())
    assert 0 < written[1] < written[0]


def test_demo_prints_a_summary_and_progress(capsys):
    assert main(["demo", *SMALL, "--g2-blocks", "0", "--g3-blocks", "0"]) == 0
    captured = capsys.readouterr()
    assert "G1 GPU" in captured.out and "G2" not in captured.out.split("prefix hits")[0]
    assert "prefill tokens saved" in captured.out and "18/18 requests" in captured.err


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--g1-blocks", "3"], "--g1-blocks"),
        (["--g2-blocks", "0", "--g3-blocks", "10"], "--g3-blocks"),
        (["--model", "nope"], "nope"),
        (["--workers", "2", "--g2-blocks", "0", "--g3-blocks", "0"], "--workers"),
        (["--disk-min-uses", "2", "--g3-blocks", "0"], "--disk-min-uses"),
        (["--peer-news"], "--peer-news"),
        (["--route", "prefix"], "--route"),
    ],
)
def test_demo_rejects_bad_sizes(capsys, args, named):
    assert main(["demo", *SMALL, *args]) == 2
    assert named in capsys.readouterr().err


def test_demo_checks_its_plot_path_before_running(capsys, tmp_path):
    assert main(["demo", *SMALL, "--plot", str(tmp_path / "no" / "demo.png")]) == 2
    captured = capsys.readouterr()
    assert "--plot is in a folder that does not exist" in captured.err
    assert "requests" not in captured.err and captured.out == ""


def test_demo_stops_on_ctrl_c_with_status_130():
    """SIGINT mid-run: the demo stops, threads and all, with no traceback (as Unix tools do)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvblocks.cli", "demo"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    first = proc.stderr.readline()
    while "requests" not in first:
        first = proc.stderr.readline()
        assert first, "the demo ended before its first progress line"
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    assert "Traceback" not in rest


def test_demo_needs_every_size_without_a_model(capsys):
    assert main(["demo", "--layers", "2", "--quiet"]) == 2
    assert "--kv-heads" in capsys.readouterr().err


def test_demo_runs_without_numpy():
    """A plain install (README's main job) has neither numpy nor Triton's interpreter."""
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "from kvblocks.cli import main\n"
        f"sys.exit(main(['demo', *{SMALL!r}, '--g1-blocks', '80', '--g2-blocks', '60',"
        " '--quiet']))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "G3 -> G2" in proc.stdout and "verified" in proc.stdout
