"""``kvblocks serve``: a cache process that workers offload to and read from (their G4)."""

import signal
import subprocess
import sys
import urllib.request

import pytest
import torch

from kvblocks.cli import main
from kvblocks.pool import Tier
from kvblocks.remote import nixl_available
from tests.test_manager import BS, tokens_of
from tests.test_sharing import assert_g1_holds, poison_g1, store, worker

pytest.importorskip("zmq")
pytest.importorskip("msgpack")


@pytest.mark.skipif(not nixl_available(), reason="NIXL is not installed")
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_serve_caches_what_one_worker_stores_for_another_until_stopped(tmp_path, stop):
    args = ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--tokens-per-block", str(BS)]
    args += ["--host-gb", str(12 * 1024 / 2**30), "--endpoint", "tcp://127.0.0.1:*"]
    args += ["--status-every", "0.2", "--metrics", "127.0.0.1:0"]
    cache = subprocess.Popen(
        [sys.executable, "-m", "kvblocks.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        endpoint, news = cache.stdout.readline().strip(), cache.stdout.readline().strip()
        assert endpoint.startswith("tcp://127.0.0.1:") and news.startswith("tcp://127.0.0.1:")
        before = []
        while not before or not before[-1].startswith("metrics at "):
            before.append(cache.stderr.readline())
        url = before[-1].split()[-1]
        gen = torch.Generator().manual_seed(12)
        tokens = tokens_of(12, 3 * BS)
        with worker(tmp_path) as writer, worker(tmp_path) as reader:
            writer.add_peer(endpoint, offload=True)
            kv = store(writer, tokens, gen)
            reader.add_peer(endpoint)
            poison_g1(reader)
            hit = reader.lookup(tokens)
            assert hit.from_tier[Tier.G4] == 3
            assert_g1_holds(reader, hit.block_ids, kv)
            reader.free(hit.block_ids)
        with urllib.request.urlopen(url, timeout=10) as response:
            assert 'kvbm_blocks_cached{tier="CPU"} 3.0' in response.read().decode()
        cache.send_signal(stop)
        out, err = cache.communicate(timeout=60)
    finally:
        cache.kill()
    err = "".join(before) + err
    assert cache.returncode == 0, err
    assert out == "" and "Traceback" not in err
    assert "kvblocks serve: 12 blocks of 1,024 bytes in G2" in err
    assert "G2 3 of 12 blocks cached (25.0%), 0 leases held, 0 evicted; stopping" in err


def test_serve_checks_its_arguments(capsys):
    assert main(["serve", "--host-gb", "1"]) == 2
    assert "--model is needed" in capsys.readouterr().err
    for bad in (["--host-gb", "0"], ["--host-gb", "1", "--metrics", "nowhere"], []):
        with pytest.raises(SystemExit) as exit_:
            main(["serve", "--model", "llama-3.2-1b", *bad])
        assert exit_.value.code == 2
        assert "kvblocks serve: error: " in capsys.readouterr().err
