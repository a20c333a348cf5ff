"""The kvblocks command."""

import json
import subprocess
import sys

import pytest
import torch

from kvblocks.cli import format_bytes, main


def test_info_llama_70b(capsys):
    assert main(["info", "--model", "llama-3.1-70b"]) == 0
    out = capsys.readouterr().out
    assert "nl=80" in out and "nh=8 KV heads" in out and "hd=128" in out
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.strip()[:2] in ("16", "64")
    }
    assert rows["16"][3:5] == ["5", "MiB"]
    assert rows["64"][3:5] == ["20", "MiB"]
    for name in ("block_stack_nhd", "operational_hnd", "universal_tp", "universal_pp"):
        assert name in out
    assert "Hardware paths here:" in out and "torch reference path" in out
    assert "no=2 outer (K and V)" in out and "(2 bytes)" in out


def test_info_of_an_mla_cache_in_raw_bytes(capsys):
    assert main(["info", "--model", "deepseek-v3", "--dtype", "uint8"]) == 0
    out = capsys.readouterr().out
    assert "no=1 outer (a latent), nh=1 KV heads, hd=576, dtype u8 (1 byte)" in out
    assert "549 KiB" in out  # 61 layers x 16 tokens x 576 bytes


def test_info_json_matches_dims(capsys):
    assert (
        main(["info", "--model", "llama-3.1-70b", "--json", "--tokens-per-block", "16,64,256"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["dims"] == {"nl": 80, "no": 2, "nh": 8, "hd": 128, "dtype": "bf16", "itemsize": 2}
    assert [s["block_bytes"] for s in report["sizes"]] == [5 << 20, 20 << 20, 80 << 20]
    assert report["layouts"]["fully_contiguous"] == [1024 * (5 << 20)]
    assert report["layouts"]["layer_separate"] == [1024 * 2 * 32768] * 80
    assert report["layouts"]["outer_separate"] == [1024 * 32768] * 160
    uni = next(f for f in report["formats"] if f["name"] == "universal_tp")
    assert uni["shape"] == [8, 80, 2, 16, 128]


def test_info_custom_dims_and_tp(capsys):
    args = [
        "info",
        "--layers",
        "4",
        "--kv-heads",
        "8",
        "--head-dim",
        "64",
        "--tp",
        "2",
        "--dtype",
        "f32",
        "--tokens-per-block",
        "32",
        "--json",
    ]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dims"]["nh"] == 4
    assert report["sizes"][0]["block_bytes"] == 4 * 2 * 32 * 4 * 64 * 4


def test_info_without_a_model_lists_the_hardware_paths(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hardware paths here:")
    assert "torch reference path" in out
    assert "Block formats" not in out
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report) == ["capabilities"]
    names = {c["name"]: c["available"] for c in report["capabilities"]}
    assert names["torch reference path"] is True
    assert names["CUDA GPU"] is torch.cuda.is_available()


@pytest.mark.parametrize(
    "args,message",
    [
        (["info", "--model", "gpt-5"], "model must be one of"),
        (["info", "--layers", "4"], "--model is needed"),
        (["info", "--model", "llama-3.1-70b", "--tp", "3"], "tp must divide"),
        (["info", "--model", "llama-3.1-70b", "--dtype", "int8"], "dtype must be one of"),
    ],
)
def test_info_errors(capsys, args, message):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err


@pytest.mark.parametrize(
    "args", [["info", "--blocks", "0"], ["info", "--tokens-per-block", "x"], []]
)
def test_usage_errors_exit_2(args):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2


def test_models(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["llama-3.1-70b"] == {"name": "llama-3.1-70b", "nl": 80, "nh": 8, "hd": 128, "no": 2}
    assert rows["deepseek-v3"]["no"] == 1


@pytest.mark.parametrize("module", ["kvblocks.cli", "kvblocks"])
def test_console_script_runs(module):
    proc = subprocess.run(
        [sys.executable, "-m", module, "info", "--model", "llama-3.1-8b"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "nl=32" in proc.stdout


def test_format_bytes():
    assert format_bytes(5 << 20) == "5 MiB"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 << 30) == "3 GiB"
    assert format_bytes(100) == "100 B"
