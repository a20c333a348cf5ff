"""``kvblocks events``: workers' KV events as JSON lines, a status line per worker, clean stops."""

import json
import random
import select
import signal
import subprocess
import sys
import threading

import pytest

from kvblocks.cli import main
from kvblocks.pool import BlockRemoved, BlockStored, EventBatch, Tier

pytest.importorskip("zmq")
pytest.importorskip("msgpack")

from kvblocks.event_watch import Followed, event_lines, watch_events  # noqa: E402
from kvblocks.pool.publishers import ZmqPublisher, encode_batch  # noqa: E402
from tests.test_subscribers import FakeWorker  # noqa: E402

BS = 4


def random_batches(rng: random.Random, n: int) -> list[EventBatch]:
    batches = []
    for i in range(n):
        hashes = tuple(rng.randrange(2**64) for _ in range(rng.randint(1, 3)))
        tier = rng.choice([Tier.G1, Tier.G2, Tier.G3])
        if rng.random() < 0.7:
            tokens = tuple(rng.randrange(2**31) for _ in range(BS * len(hashes)))
            event = BlockStored(hashes, rng.choice([None, rng.randrange(2**64)]), tokens, BS, tier)
        else:
            event = BlockRemoved(hashes, tier)
        batches.append(EventBatch(1000.0 + i, (event,)))
    return batches


def expected_lines(worker, batches, tokens=False):
    return [line for b in batches for line in event_lines(worker, b, tokens)]


def test_events_prints_every_event_of_two_workers_as_json_lines():
    """Two publishers with replay; the command comes after their first batches (replayed)
    and prints the rest as they come; each worker's lines in order, tokens on request."""
    rng = random.Random(4)
    publishers = [
        ZmqPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*") for _ in range(2)
    ]
    batches = [random_batches(rng, 30), random_batches(rng, 30)]
    try:
        for p, bs in zip(publishers, batches, strict=True):
            for b in bs[:10]:
                p.publish(b)
        args = [sys.executable, "-m", "kvblocks.cli", "events", "--tokens", "--count", "60"]
        args += [p.endpoint for p in publishers]
        for p in publishers:
            args += ["--replay", p.replay_endpoint]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = [json.loads(proc.stdout.readline()) for _ in range(20)]  # the replayed ones
        for p, bs in zip(publishers, batches, strict=True):
            for b in bs[10:]:
                p.publish(b)
        out, err = proc.communicate(timeout=60)
        lines += [json.loads(line) for line in out.splitlines()]
    finally:
        for p in publishers:
            p.close()
    assert proc.returncode == 0, err
    for p, bs in zip(publishers, batches, strict=True):
        mine = [line for line in lines if line["worker"] == p.endpoint]
        assert mine == expected_lines(p.endpoint, bs, tokens=True)
    assert len(lines) == 60


def test_event_lines_give_bytes_hashes_in_hex_and_tiers_by_name():
    batch = EventBatch(
        5.0,
        (
            BlockStored((b"\x01\xff",), b"\x00", tuple(range(BS)), BS, Tier.G2),
            BlockRemoved((7,), Tier.G3),
        ),
    )
    assert event_lines("w", batch, tokens=False) == [
        {
            "worker": "w",
            "ts": 5.0,
            "type": "BlockStored",
            "tier": "G2",
            "medium": "CPU",
            "block_hashes": ["01ff"],
            "parent_block_hash": "00",
            "block_size": BS,
        },
        {
            "worker": "w",
            "ts": 5.0,
            "type": "BlockRemoved",
            "tier": "G3",
            "medium": "DISK",
            "block_hashes": [7],
        },
    ]


def test_a_lost_stretch_prints_as_lost_and_status_lines_count_blocks(tmp_path):
    worker = FakeWorker()
    stop = threading.Event()
    out, log = tmp_path / "out", tmp_path / "log"
    stored = EventBatch(1.0, (BlockStored((1, 2, 3), None, tuple(range(3 * BS)), BS, Tier.G1),))
    try:
        worker.send(0, payload=encode_batch(stored))
        worker.send(1, publish=False, keep=False)
        worker.send(2)
        with out.open("w") as o, log.open("w") as g:
            printed = watch_events(
                [Followed("w", worker.endpoint, worker.replay_endpoint)],
                stop,
                out=o,
                log=g,
                count=3,
                status_every=60,
            )
    finally:
        worker.close()
    assert printed == 3
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["type"] for line in lines] == ["BlockStored", "Lost", "BlockStored"]
    assert lines[1] == {"worker": "w", "type": "Lost"}
    (status,) = log.read_text().splitlines()
    # the loss forgot blocks 1, 2, 3; batch 2 stored one block (hash 3)
    assert status.endswith("w: G1 1; 2 batches (2 replayed), 1 lost")


def test_events_stops_cleanly_on_sigterm_and_sigint():
    for sig in (signal.SIGTERM, signal.SIGINT):
        worker = FakeWorker()
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kvblocks.cli",
                    "events",
                    worker.endpoint,
                    "--status-every",
                    "100",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            while not select.select([proc.stdout], [], [], 0.05)[0]:
                worker.send(0)  # a SUB socket joins late: send until a line comes back
            assert json.loads(proc.stdout.readline())["type"] == "BlockStored"
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
            worker.close()
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert err.strip().endswith(f"{worker.endpoint}: G1 1; 1 batches (0 replayed), 0 lost")


def test_events_checks_its_arguments(capsys):
    assert main(["events", "tcp://127.0.0.1:1", "tcp://a:3", "--replay", "tcp://127.0.0.1:2"]) == 2
    assert "--replay" in capsys.readouterr().err
    assert main(["events", "tcp://127.0.0.1:1", "tcp://127.0.0.1:1"]) == 2
    assert "ENDPOINT" in capsys.readouterr().err
    assert main(["events", "nonsense://x"]) == 2
    assert "endpoint" in capsys.readouterr().err
    for bad in ([], ["tcp://127.0.0.1:1", "--count", "0"], ["tcp://127.0.0.1:1", "--seconds", "x"]):
        with pytest.raises(SystemExit) as exit_:
            main(["events", *bad])
        assert exit_.value.code == 2
    assert main(["demo", "--zmq-replay", "tcp://127.0.0.1:2"]) == 2
    assert "error: --zmq-replay needs --zmq" in capsys.readouterr().err
