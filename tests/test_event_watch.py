"""``kvblocks events``: workers' KV events as JSON lines, a status line per worker, clean stops."""

import json
import random
import select
import signal
import subprocess
import sys
import threading
import time

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


def wait_quiet(subscriber, timeout: float = 10.0) -> None:
    """Wait until ``subscriber`` hears no batch for 0.5 s (or ``timeout`` passes)."""
    heard, deadline = -1, time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if heard == (heard := sum(s.batches for s in subscriber.states())):
            return


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
    assert main(["events"]) == 2
    assert "ENDPOINT is missing: name a worker's endpoint, or --nats URL" in capsys.readouterr().err
    assert main(["events", "tcp://127.0.0.1:1", "--subject", "kv"]) == 2
    assert "--subject needs --nats" in capsys.readouterr().err
    for bad in (["tcp://127.0.0.1:1", "--count", "0"], ["tcp://127.0.0.1:1", "--seconds", "x"]):
        with pytest.raises(SystemExit) as exit_:
            main(["events", *bad])
        assert exit_.value.code == 2
    assert main(["demo", "--zmq-replay", "tcp://127.0.0.1:2"]) == 2
    assert "error: --zmq-replay needs --zmq" in capsys.readouterr().err
    assert main(["demo", "--nats-worker", "w"]) == 2
    assert "error: --nats-worker needs --nats" in capsys.readouterr().err
    assert main(["serve", "--model", "llama-3.2-1b", "--host-gb", "1", "--nats-stream", "KV"]) == 2
    assert "error: --nats-stream needs --nats" in capsys.readouterr().err
    assert main(["events", "tcp://127.0.0.1:1", "--stream", "KV"]) == 2
    assert "--stream needs --nats" in capsys.readouterr().err


def test_events_reads_every_worker_on_a_nats_subject(nats_server):
    """Two workers publish on subjects a wildcard covers; each one's lines come in order, the
    worker named as it publishes, and a status line each at the end."""
    from kvblocks.pool.publishers import NatsPublisher

    rng = random.Random(5)
    batches = {"a": random_batches(rng, 20), "b": random_batches(rng, 20)}
    probe = EventBatch(1.0, (BlockRemoved((1,), Tier.G1),))
    publishers = {w: NatsPublisher(nats_server, f"kv.{w}", worker=w) for w in batches}
    args = [sys.executable, "-m", "kvblocks.cli", "events", "--nats", nats_server]
    args += ["--subject", "kv.*", "--status-every", "100"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not select.select([proc.stdout], [], [], 0.05)[0]:
            publishers["a"].publish(probe)  # until the command has subscribed
        for w, bs in batches.items():
            for b in bs:
                publishers[w].publish(b)
        lines = []
        while sum(line["ts"] != 1.0 for line in lines) < 40:
            lines.append(json.loads(proc.stdout.readline()))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        for p in publishers.values():
            p.close()
    assert proc.returncode == 0, err
    lines += [json.loads(line) for line in out.splitlines()]
    for w, bs in batches.items():
        mine = [line for line in lines if line["worker"] == w and line["ts"] != 1.0]
        assert mine == expected_lines(w, bs)
    status = err.strip().splitlines()
    assert [line.split()[1] for line in status] == ["a:", "b:"]
    assert all(line.endswith("(0 replayed), 0 lost") for line in status)


@pytest.mark.parametrize("workers", [1, 2])
def test_demo_publishes_each_worker_to_nats_under_its_name(nats_server, capsys, workers):
    """``--nats`` with ``--zmq`` too: the NATS side names each worker as told and carries every
    batch the demo's managers published, in order (no gap in any worker's seq), the last one
    clearing the worker's blocks as its manager closed."""
    from kvblocks.pool import AllBlocksCleared, BlockStored, KvIndex
    from kvblocks.pool.nats_subscriber import NatsSubscriber
    from kvblocks.remote import nixl_available
    from tests.helpers import free_port
    from tests.test_demo import SMALL

    if workers > 1 and not nixl_available():
        pytest.skip("workers share blocks through NIXL")

    class Recording(KvIndex):
        def apply(self, worker, batch):
            events.setdefault(worker, []).extend(batch.events)
            super().apply(worker, batch)

    events = {}
    index = Recording(16)
    with NatsSubscriber(index, nats_server) as subscriber:
        zmq_endpoint = f"tcp://127.0.0.1:{free_port()}"
        args = ["demo", *SMALL, "--g1-blocks", "80", "--g2-blocks", "60", "--quiet", "--json"]
        args += ["--nats", nats_server, "--nats-worker", "demo", "--zmq", zmq_endpoint]
        assert main([*args, "--workers", str(workers)]) == 0
        result = json.loads(capsys.readouterr().out)
        wait_quiet(subscriber)
        states = subscriber.states()
    names = ["demo"] if workers == 1 else [f"demo-w{i}" for i in range(workers)]
    assert [s.worker for s in states] == [v.worker for v in index.workers()] == names
    assert all(s.lost == 0 and s.bad == 0 and s.batches == s.next_seq > 0 for s in states)
    assert result["hits"]["G2"] > 0
    for name in names:
        stored = [e for e in events[name] if isinstance(e, BlockStored)]
        assert any(e.tier is Tier.G2 for e in stored)
        assert isinstance(events[name][-1], AllBlocksCleared)
    assert all(sum(v.blocks.values()) == 0 for v in index.workers())


def test_events_reads_what_a_stream_kept_of_a_demo_that_ended(nats_jetstream_server, capsys):
    """The demo publishes into a JetStream stream and ends; ``kvblocks events --stream`` started
    after prints every event it published, and a status line with no loss."""
    from tests.test_demo import SMALL

    url = nats_jetstream_server
    args = ["demo", *SMALL, "--g1-blocks", "80", "--g2-blocks", "60", "--quiet", "--json"]
    args += ["--nats", url, "--nats-worker", "w", "--nats-stream", "KV"]
    published = []

    class Lines:
        def apply(self, worker, batch):
            published.extend(event_lines(worker, batch, tokens=False))

        def lost(self, worker):
            raise AssertionError("lost")

    from kvblocks.pool.nats_subscriber import NatsSubscriber

    with NatsSubscriber(Lines(), url, stream="KV") as subscriber:  # live, while it runs
        assert main(args) == 0
        wait_quiet(subscriber)
    capsys.readouterr()
    command = [sys.executable, "-m", "kvblocks.cli", "events", "--nats", url, "--stream", "KV"]
    command += ["--count", str(len(published)), "--status-every", "100"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line) for line in proc.stdout.splitlines()] == published
    (status,) = proc.stderr.strip().splitlines()
    assert status.endswith(f"w: {status.split('w: ')[1]}") and status.endswith("0 lost")
