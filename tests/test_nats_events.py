"""KV events over NATS: NatsPublisher's headers, and NatsSubscriber reading many workers from
one subject, telling losses and restarts (against a real nats-server)."""

import logging
import os
import random
import socket
import time

import pytest
import torch

from kvblocks.errors import InvalidArgumentError, TransferError
from kvblocks.pool import BlockManager

pytest.importorskip("nats")
pytest.importorskip("msgpack")

from kvblocks.pool.kv_index import KvIndex  # noqa: E402
from kvblocks.pool.nats_link import (  # noqa: E402
    ALIVE_HEADER,
    NEXT_SEQ_HEADER,
    SEQ_HEADER,
    WORKER_HEADER,
    NatsLink,
    subject_matches,
)
from kvblocks.pool.nats_subscriber import NatsSubscriber  # noqa: E402
from kvblocks.pool.publishers import NatsPublisher, encode_batch  # noqa: E402
from tests.conftest import start_nats_server  # noqa: E402
from tests.helpers import free_port  # noqa: E402
from tests.test_kv_index import TIERS  # noqa: E402
from tests.test_manager import BS, make_config, store  # noqa: E402
from tests.test_subscribers import (  # noqa: E402
    Recorder,
    assert_gone_once,
    batch_of,
    index_agrees,
    wait_until,
)


class Sender:
    """A bare NATS client that sends batches with the headers it is told to."""

    def __init__(self, url: str) -> None:
        self.link = NatsLink(url, name="test-sender")

    def send(
        self,
        subject: str,
        seq: int | None,
        worker: str | None = None,
        payload=None,
        alive_every: float | None = None,
    ):
        headers = {}
        if worker is not None:
            headers[WORKER_HEADER] = worker
        if seq is not None:
            headers[SEQ_HEADER] = str(seq)
        if alive_every is not None:
            headers[ALIVE_HEADER] = str(alive_every)
        payload = encode_batch(batch_of(seq or 0)) if payload is None else payload
        self._publish(subject, payload, headers)

    def beat(self, subject: str, worker: str, next_seq: int, alive_every: float):
        """A heartbeat as a NatsPublisher sends it."""
        headers = {
            WORKER_HEADER: worker,
            ALIVE_HEADER: str(alive_every),
            NEXT_SEQ_HEADER: str(next_seq),
        }
        self._publish(subject, b"", headers)

    def _publish(self, subject: str, payload: bytes, headers: dict[str, str]):
        client = self.link.client
        self.link.run(client.publish(subject, payload, headers=headers or None), 5)
        self.link.run(client.flush(), 5)

    def close(self) -> None:
        self.link.close()


@pytest.fixture
def sender(nats_server):
    s = Sender(nats_server)
    yield s
    s.close()


def test_index_follows_managers_publishing_on_one_subject(nats_server, tmp_path):
    """Three managers publish on one subject; a subscriber on it tells them apart by their
    worker names, and its index agrees with their pools on every prompt."""
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(3)
    index = KvIndex(BS)
    managers, publishers = {}, {}
    prefixes = [[rng.randrange(1000) for _ in range(BS * rng.randint(1, 5))] for _ in range(4)]
    prompts = []
    try:
        with NatsSubscriber(index, nats_server) as subscriber:
            for name in ("w0", "w1", "w2"):
                publishers[name] = NatsPublisher(nats_server, worker=name)
                (tmp_path / name).mkdir()
                managers[name] = BlockManager(
                    make_config(tmp_path / name), publisher=publishers[name]
                )
            for _ in range(60):
                tokens = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(9)]
                prompts.append(tokens)
                store(managers[rng.choice(sorted(managers))], tokens, gen)
            for manager in managers.values():
                manager.flush()
            wait_until(lambda: index_agrees(index, managers, prompts))
            states = {s.worker: s for s in subscriber.states()}
            assert sorted(states) == ["w0", "w1", "w2"]
            assert all(s.endpoint == "kv-events" for s in states.values())
            assert all(s.lost == 0 and s.bad == 0 and s.next_seq >= 1 for s in states.values())
            assert any(v.blocks.get(t) for v in index.workers() for t in TIERS[1:])  # offloads
    finally:
        for name in managers:
            managers[name].close()
            publishers[name].close()


def test_gaps_and_restarts_are_losses_and_workers_without_headers_go_by_subject(
    nats_server, sender
):
    recorder = Recorder()
    with NatsSubscriber(recorder, nats_server, subject="kv.*") as subscriber:
        sender.send("kv.a", 0, worker="w")
        sender.send("kv.a", 1, worker="w")
        sender.send("kv.b", 3, worker="w")  # 2 was lost (the subject does not matter)
        sender.send("kv.a", 0, worker="w")  # started over
        sender.send("kv.a", 5)  # no worker header: known by its subject
        sender.send("kv.a", None, worker="n")  # no seq: nothing to tell a loss by
        sender.send("kv.a", None, worker="n", payload=b"\x93 not msgpack of a batch")
        items = recorder.wait_for(9)
        assert items == [
            ("batch", "w", 0),
            ("batch", "w", 1),
            ("lost", "w"),
            ("batch", "w", 3),
            ("lost", "w"),
            ("batch", "w", 0),
            ("batch", "kv.a", 5),
            ("batch", "n", 0),
            ("lost", "n"),
        ]
        states = {s.worker: s for s in subscriber.states()}
        assert (states["w"].next_seq, states["w"].batches, states["w"].lost) == (1, 4, 2)
        assert states["w"].endpoint == "kv.a"
        assert (states["n"].next_seq, states["n"].bad, states["n"].lost) == (None, 1, 1)
        assert states["kv.a"].next_seq == 6


def test_publisher_numbers_its_batches_names_its_worker_and_beats(nats_server):
    """Batches carry the worker's name, their seq and the heartbeats' period; a heartbeat
    (no payload) names the seq of the next batch."""
    got = []

    async def listen(msg):
        got.append((msg.headers, msg.data))

    link = NatsLink(nats_server, name="test-listener")
    try:
        link.run(link.client.subscribe("kv-events", cb=listen), 5)
        link.run(link.client.flush(), 5)
        batches = [batch_of(seq) for seq in range(5)]
        with NatsPublisher(nats_server, alive_every=0.25) as publisher:
            for batch in batches:
                publisher.publish(batch)
            wait_until(lambda: len(got) >= 6)
        worker = f"{socket.gethostname()}-{os.getpid()}"
        named = {WORKER_HEADER: worker, ALIVE_HEADER: "0.25"}
        assert got[:6] == [
            *(({**named, SEQ_HEADER: str(seq)}, encode_batch(b)) for seq, b in enumerate(batches)),
            ({**named, NEXT_SEQ_HEADER: "5"}, b""),
        ]
        count = len(got)
        time.sleep(0.6)  # closed: no more heartbeats
        assert len(got) == count
    finally:
        link.close()


def test_a_worker_whose_heartbeats_stop_is_gone_once_then_back(nats_server, sender):
    """A worker that sends heartbeats and then nothing for gone_after seconds (a process that
    died without closing) is lost once, and the index forgets its blocks; heard again, it is
    read as usual. A heartbeat naming a later seq than was read tells of dropped batches."""
    index = KvIndex(BS)
    recorder = Recorder(index)
    with NatsSubscriber(recorder, nats_server, gone_after=1.0) as subscriber:
        sender.send("kv-events", 0, worker="w", alive_every=0.1)
        recorder.wait_for(1)
        for _ in range(15):  # 1.5 s, longer than gone_after, with heartbeats: not gone
            time.sleep(0.1)
            sender.beat("kv-events", "w", 1, alive_every=0.1)
        assert recorder.items == [("batch", "w", 0)] and not subscriber.states()[0].gone
        assert index.overlaps_of([1])[0].blocks == 1
        assert_gone_once(recorder, subscriber, index, not_before=0.9)
        sender.beat("kv-events", "w", 1, alive_every=0.1)
        wait_until(lambda: not subscriber.states()[0].gone)
        sender.send("kv-events", 1, worker="w", alive_every=0.1)
        sender.beat("kv-events", "w", 4, alive_every=0.1)  # 2 and 3 were dropped
        sender.send("kv-events", 4, worker="w", alive_every=0.1)
        assert recorder.wait_for(5)[2:] == [("batch", "w", 1), ("lost", "w"), ("batch", "w", 4)]
        state = subscriber.states()[0]
        assert (state.gone, state.lost, state.next_seq) == (False, 2, 5)
        assert index.overlaps_of([5])[0].blocks == 1


def test_workers_without_heartbeats_are_never_gone(nats_server, sender):
    """Silence from a worker that sends no heartbeats may be a worker with nothing to say; a
    subscriber with gone_after None takes no worker for gone."""
    recorder = Recorder()
    with (
        NatsSubscriber(recorder, nats_server, gone_after=0.3) as subscriber,
        NatsSubscriber(Recorder(), nats_server, gone_after=None) as patient,
    ):
        sender.send("kv-events", 0, worker="quiet")
        sender.send("kv-events", 0, worker="beating", alive_every=0.05)
        time.sleep(1.0)
        assert recorder.items[-1] == ("lost", "beating")
        assert ("lost", "quiet") not in recorder.items
        assert {s.worker: s.gone for s in subscriber.states()} == {"beating": True, "quiet": False}
        assert not any(s.gone or s.lost for s in patient.states())


def test_a_publisher_that_closes_is_gone_to_subscribers(nats_server):
    """Through NatsPublisher itself: its heartbeats keep it known past gone_after; once it
    closes (no AllBlocksCleared here: a bare publisher), its silence makes it gone."""
    recorder = Recorder()
    with NatsSubscriber(recorder, nats_server, gone_after=1.0) as subscriber:
        publisher = NatsPublisher(nats_server, worker="w", alive_every=0.1)
        publisher.publish(batch_of(0))
        recorder.wait_for(1)
        time.sleep(1.5)
        assert not subscriber.states()[0].gone
        publisher.close()
        assert recorder.wait_for(2)[1] == ("lost", "w")
        assert subscriber.states()[0].gone


def test_a_lost_connection_is_a_loss_for_workers_without_seq(caplog):
    """Batches published while the subscriber is away are gone: workers whose messages carry no
    seq are told at once; numbered workers find the gap in their next batch."""
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    server = start_nats_server(port)
    recorder = Recorder()
    try:
        with NatsSubscriber(recorder, url, subject="kv") as subscriber:
            sender = Sender(url)
            sender.send("kv", None, worker="n")
            sender.send("kv", 0, worker="w")
            recorder.wait_for(2)
            sender.link.close()
            with caplog.at_level(logging.WARNING, logger="kvblocks.pool.nats_subscriber"):
                server.terminate()
                server.wait()
                items = recorder.wait_for(3)
            assert items[2] == ("lost", "n")
            assert "disconnected from NATS" in caplog.text
            server = start_nats_server(port)
            wait_until(lambda: subscriber.connected, timeout=20)
            sender = Sender(url)
            sender.send("kv", 2, worker="w")
            items = recorder.wait_for(5)
            assert items[3:] == [("lost", "w"), ("batch", "w", 2)]
            sender.close()
    finally:
        server.terminate()
        server.wait()


def test_arguments_are_checked_and_a_missing_server_named(nats_server):
    with pytest.raises(InvalidArgumentError, match="subject"):
        NatsPublisher(nats_server, subject="kv-events.*")
    with pytest.raises(InvalidArgumentError, match="subject"):
        NatsSubscriber(Recorder(), nats_server, subject="kv..events")
    with pytest.raises(InvalidArgumentError, match="subject"):
        NatsSubscriber(Recorder(), nats_server, subject="kv.>.events")
    with pytest.raises(InvalidArgumentError, match="worker"):
        NatsPublisher(nats_server, worker="two\nlines")
    with pytest.raises(TransferError, match="NATS"):
        NatsSubscriber(Recorder(), f"nats://127.0.0.1:{free_port()}", connect_timeout=0.5)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "5"):
        with pytest.raises(InvalidArgumentError, match="alive_every must be > 0 seconds"):
            NatsPublisher(nats_server, alive_every=bad)
        with pytest.raises(InvalidArgumentError, match="gone_after must be > 0 seconds"):
            NatsSubscriber(Recorder(), nats_server, gone_after=bad)


def test_a_stream_keeps_the_batches_for_subscribers_that_come_later(nats_jetstream_server):
    """Two workers publish into one JetStream stream (the second adds its subject to it); a
    subscriber that comes after reads everything kept, in each worker's order, then the new
    batches, with no loss; a second one, later still, reads it all again."""
    url = nats_jetstream_server
    publishers = {w: NatsPublisher(url, f"kv.{w}", worker=w, stream="KV") for w in ("a", "b")}
    try:
        for seq in range(10):
            for p in publishers.values():
                p.publish(batch_of(seq))
        recorder = Recorder()
        with NatsSubscriber(recorder, url, subject="kv.*", stream="KV") as subscriber:
            recorder.wait_for(20)
            for seq in range(10, 15):
                for p in publishers.values():
                    p.publish(batch_of(seq))
            items = recorder.wait_for(30)
            states = subscriber.states()
        for w in ("a", "b"):
            assert [i for i in items if i[1] == w] == [("batch", w, s) for s in range(15)]
        assert [(s.worker, s.next_seq, s.lost) for s in states] == [("a", 15, 0), ("b", 15, 0)]
        again = Recorder()
        with NatsSubscriber(again, url, subject="kv.b", stream="KV"):
            assert again.wait_for(15) == [("batch", "b", s) for s in range(15)]
    finally:
        for p in publishers.values():
            p.close()


def test_a_subscriber_may_come_before_the_workers_and_their_stream(nats_jetstream_server):
    recorder = Recorder()
    url = nats_jetstream_server
    with NatsSubscriber(recorder, url, subject="kv.>", stream="KV"):
        with NatsPublisher(url, "kv.a.b", worker="w", stream="KV") as publisher:
            for seq in range(3):
                publisher.publish(batch_of(seq))
        assert recorder.wait_for(3) == [("batch", "w", s) for s in range(3)]


def test_a_stream_needs_jetstream_and_a_name(nats_server):
    with pytest.raises(TransferError, match="-js"):
        NatsPublisher(nats_server, stream="KV")
    with pytest.raises(TransferError, match="-js"):
        NatsSubscriber(Recorder(), nats_server, stream="KV")
    for bad in ("", "kv.events", "two words", "a>"):
        with pytest.raises(InvalidArgumentError, match="stream"):
            NatsPublisher(nats_server, stream=bad)
        with pytest.raises(InvalidArgumentError, match="stream"):
            NatsSubscriber(Recorder(), nats_server, stream=bad)
    with pytest.raises(InvalidArgumentError, match="stream_bytes"):
        NatsPublisher(nats_server, stream="KV", stream_bytes=0)
    with pytest.raises(InvalidArgumentError, match="stream_bytes"):
        NatsSubscriber(Recorder(), nats_server, stream="KV", stream_bytes=0)


@pytest.mark.parametrize(
    "pattern, subject, matches",
    [
        ("kv", "kv", True),
        ("kv", "kv.a", False),
        ("kv.*", "kv.a", True),
        ("kv.*", "kv.a.b", False),
        ("kv.*", "kv", False),
        ("kv.>", "kv.a.b", True),
        ("kv.>", "kv", False),
        ("*.a", "kv.a", True),
        ("kv.b", "kv.a", False),
    ],
)
def test_subject_matches_as_nats_does(pattern, subject, matches):
    assert subject_matches(pattern, subject) is matches
