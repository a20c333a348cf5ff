"""ZmqSubscriber: workers' KV events read in order, gaps filled from replays, losses told."""

import logging
import random
import threading
import time

import pytest
import torch

from kvblocks.errors import InvalidArgumentError
from kvblocks.pool import (
    AllBlocksCleared,
    BlockManager,
    BlockStored,
    EventBatch,
    Tier,
    sequence_hashes,
)

zmq = pytest.importorskip("zmq")
pytest.importorskip("msgpack")

from kvblocks.pool.kv_index import KvIndex  # noqa: E402
from kvblocks.pool.publishers import REPLAY_END, ZmqPublisher, encode_batch  # noqa: E402
from kvblocks.pool.zmq_subscriber import ZmqSubscriber  # noqa: E402
from tests.test_kv_index import TIERS, assert_overlaps  # noqa: E402
from tests.test_manager import BS, make_config, store  # noqa: E402

TOPIC = b"kv-events"


def batch_of(seq: int, restarted: bool = False) -> EventBatch:
    """A batch that says which seq it was sent as (in its ts, + 0.5 once the worker
    restarted, so that its payload differs from the first life's batch of that seq)."""
    stored = BlockStored((seq + 1,), None, tuple(range(BS)), BS, Tier.G1)
    return EventBatch(seq + 0.5 * restarted, (stored,))


class FakeWorker:
    """A PUB socket and a replay ROUTER told batch by batch what to do: a batch may be sent
    but not published (a drop on the way) or not kept for replay (out of the buffer)."""

    def __init__(self) -> None:
        context = zmq.Context.instance()
        self.pub = context.socket(zmq.PUB)
        self.endpoint = f"tcp://127.0.0.1:{self.pub.bind_to_random_port('tcp://127.0.0.1')}"
        self.router = context.socket(zmq.ROUTER)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.replay_endpoint = f"tcp://127.0.0.1:{port}"
        self.kept: list[tuple[int, bytes]] = []
        self.replays: list[int] = []  # start seqs asked for
        self.replay_delay = 0.0  # seconds before a replay is answered
        self.silent = False  # replays are read and never answered (a hung or dead process)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def send(
        self, seq: int, payload: bytes | None = None, publish=True, keep=True, restarted=False
    ) -> None:
        payload = encode_batch(batch_of(seq, restarted)) if payload is None else payload
        with self.lock:
            if keep:
                self.kept.append((seq, payload))
            if publish:
                self.pub.send_multipart((TOPIC, seq.to_bytes(8, "big"), payload))

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.router.poll(20):
                continue
            client, _, start = self.router.recv_multipart()
            if self.silent:
                continue
            first = int.from_bytes(start, "big")
            time.sleep(self.replay_delay)
            with self.lock:
                self.replays.append(first)
                kept = [(s, p) for s, p in self.kept if s >= first]
            for seq, payload in kept:
                self.router.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            end = REPLAY_END.to_bytes(8, "big", signed=True)
            self.router.send_multipart((client, b"", end, b""))

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.pub.close(0)
        self.router.close(0)


class Recorder:
    """A sink that records ("batch", worker, seq) and ("lost", worker), and hands each batch
    and loss on to ``index`` first when given one."""

    def __init__(self, index: KvIndex | None = None) -> None:
        self.items: list[tuple] = []
        self.cond = threading.Condition()
        self.index = index

    def apply(self, worker, batch):
        if self.index is not None:
            self.index.apply(worker, batch)
        with self.cond:
            self.items.append(("batch", worker, int(batch.ts)))
            self.cond.notify_all()

    def lost(self, worker):
        if self.index is not None:
            self.index.lost(worker)
        with self.cond:
            self.items.append(("lost", worker))
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[tuple]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= n, timeout), self.items
            return list(self.items)


@pytest.fixture
def worker():
    fake = FakeWorker()
    yield fake
    fake.close()


def hear_first(worker: FakeWorker, recorder: Recorder) -> int:
    """Send batches 0, 1, ... until a subscriber without replay hears one (a SUB socket joins
    late); return the seq of the first it heard, the last one sent."""
    seq = 0
    while True:
        worker.send(seq)
        time.sleep(0.02)
        with recorder.cond:
            if recorder.items:
                assert recorder.items == [("batch", "w", seq)]
                return seq
        seq += 1


def index_agrees(index: KvIndex, managers: dict[str, BlockManager], prompts) -> bool:
    """Whether ``index`` gives every prompt the overlaps the managers' pools hold now."""
    truth = {w: {t: set(m.pool(t).cached_hashes()) for t in TIERS} for w, m in managers.items()}
    try:
        for tokens in prompts:
            assert_overlaps(index, truth, sequence_hashes(tokens, BS), (tokens, 0))
    except AssertionError:
        return False
    return True


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_index_follows_managers_through_their_publishers(tmp_path):
    """Two BlockManagers publish over ZMQ with replay; the subscriber comes after some
    traffic (which it replays) and follows the rest; its index agrees with their pools."""
    rng = random.Random(2)
    gen = torch.Generator().manual_seed(2)
    index = KvIndex(BS)
    managers, publishers = {}, {}
    for name in ("a", "b"):
        publishers[name] = ZmqPublisher("tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*")
        (tmp_path / name).mkdir()
        managers[name] = BlockManager(make_config(tmp_path / name), publisher=publishers[name])
    prefixes = [[rng.randrange(1000) for _ in range(BS * rng.randint(1, 5))] for _ in range(4)]
    prompts = []

    def serve(n):
        for _ in range(n):
            tokens = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randint(0, 9))]
            prompts.append(tokens)
            store(managers[rng.choice("ab")], tokens, gen)
        for m in managers.values():
            m.flush()

    subscriber = ZmqSubscriber(index)
    try:
        serve(20)
        for name, p in publishers.items():
            subscriber.follow(name, p.endpoint, p.replay_endpoint)
        states = {s.worker: s for s in subscriber.states()}
        assert all(states[w].replayed == states[w].batches > 0 for w in states)
        serve(40)

        wait_until(lambda: index_agrees(index, managers, prompts))
        assert all(s.lost == 0 and s.bad == 0 for s in subscriber.states())
    finally:
        subscriber.close()
        for name in managers:
            managers[name].close()
            publishers[name].close()


def test_gaps_are_filled_from_the_replay_in_order(worker):
    """Random batches never reach the SUB socket, the last one included; every batch is
    delivered once, in order, the last after ``check_every`` of silence."""
    rng = random.Random(7)
    recorder = Recorder()
    with ZmqSubscriber(recorder, check_every=0.3) as subscriber:
        worker.send(0)
        worker.send(1, publish=False)
        subscriber.follow("w", worker.endpoint, worker.replay_endpoint)
        assert recorder.items == [("batch", "w", 0), ("batch", "w", 1)]  # before follow returned
        for seq in range(2, 40):
            worker.send(seq, publish=seq == 39 or rng.random() < 0.5)
        recorder.wait_for(40)
        time.sleep(0.1)
        asked = len(worker.replays)
        worker.send(40, publish=False)
        items = recorder.wait_for(41)
        assert len(worker.replays) > asked
        assert items == [("batch", "w", s) for s in range(41)]
        (state,) = subscriber.states()
        assert state.next_seq == 41 and state.batches == 41 and state.lost == 0
        assert state.replayed >= 20


def test_batches_no_replay_brings_back_are_lost_once_and_the_index_forgets(worker):
    index = KvIndex(BS)
    recorder = Recorder(index)

    with ZmqSubscriber(recorder, check_every=0.3) as subscriber:
        subscriber.follow("w", worker.endpoint, worker.replay_endpoint)
        for seq in range(3):
            worker.send(seq)
        recorder.wait_for(3)
        assert index.overlaps_of([1])[0].blocks == 1
        for seq in range(3, 6):
            worker.send(seq, publish=False, keep=False)  # out of the replay buffer too
        worker.send(6)
        items = recorder.wait_for(5)
        assert items[3:] == [("lost", "w"), ("batch", "w", 6)]
        assert index.overlaps_of([1])[0].blocks == 0  # forgotten: the lost batches may remove
        assert index.overlaps_of([7])[0].blocks == 1
        assert subscriber.states()[0].lost == 1


def test_without_replay_a_gap_is_lost_and_a_bad_payload_too(worker):
    recorder = Recorder()
    with ZmqSubscriber(recorder) as subscriber:
        subscriber.follow("w", worker.endpoint)
        first = hear_first(worker, recorder)
        worker.send(first + 1)
        worker.send(first + 2, publish=False)
        worker.send(first + 3)
        worker.send(first + 4, payload=b"\x93 not msgpack of a batch")
        worker.send(first + 5)
        items = recorder.wait_for(6)
        assert items == [
            ("batch", "w", first),
            ("batch", "w", first + 1),
            ("lost", "w"),
            ("batch", "w", first + 3),
            ("lost", "w"),
            ("batch", "w", first + 5),
        ]
        (state,) = subscriber.states()
        assert state.lost == 2 and state.bad == 1 and state.replay_endpoint is None


def test_batches_both_replayed_and_heard_are_delivered_once(worker):
    """Batches sent while the replay is answered reach the subscriber twice: through the
    replay and through the SUB socket. The repeats are not taken for a worker starting over."""
    recorder = Recorder()
    worker.replay_delay = 0.3
    for seq in range(3):
        worker.send(seq)
    sender = threading.Timer(0.1, lambda: [worker.send(seq) for seq in range(3, 6)])
    sender.start()
    with ZmqSubscriber(recorder, check_every=5) as subscriber:
        subscriber.follow("w", worker.endpoint, worker.replay_endpoint)
        sender.join()
        worker.send(6)
        items = recorder.wait_for(7)
        time.sleep(0.2)
        assert recorder.items == items == [("batch", "w", seq) for seq in range(7)]
        assert subscriber.states()[0].replayed == 6


@pytest.mark.parametrize("heard_since_replay", [True, False])
def test_a_worker_that_starts_over_is_read_from_its_first_batch_again(worker, heard_since_replay):
    """A restarted worker counts from 0 again and keeps only its new batches: what came
    before is lost once, and the new batches are delivered from 0 on, the ones the SUB socket
    missed through the replay. So also when the batches it repeats came through a replay."""
    recorder = Recorder()
    with ZmqSubscriber(recorder, check_every=0.3) as subscriber:
        for seq in range(5):
            worker.send(seq)
        subscriber.follow("w", worker.endpoint, worker.replay_endpoint)
        if heard_since_replay:
            for seq in range(5, 8):
                worker.send(seq)
        heard = recorder.wait_for(8 if heard_since_replay else 5)
        time.sleep(0.5)  # a silence check or two
        with worker.lock:
            worker.kept.clear()
        worker.send(0, publish=False, restarted=True)
        worker.send(1, restarted=True)
        worker.send(2, restarted=True)
        items = recorder.wait_for(len(heard) + 4)
        assert items[len(heard) :] == [
            ("lost", "w"),
            ("batch", "w", 0),
            ("batch", "w", 1),
            ("batch", "w", 2),
        ]
        time.sleep(0.5)  # a silence check asks from the new count, and finds nothing missing
        assert recorder.items == items
        (state,) = subscriber.states()
        assert state.next_seq == 3 and state.lost == 1 and state.batches == len(heard) + 3


def test_without_replay_a_worker_that_starts_over_is_read_from_where_it_is(worker):
    recorder = Recorder()
    with ZmqSubscriber(recorder) as subscriber:
        subscriber.follow("w", worker.endpoint)
        first = hear_first(worker, recorder)
        worker.send(first + 1)
        worker.send(first, restarted=True)  # started over; its batches before were not heard
        worker.send(first + 1, restarted=True)
        items = recorder.wait_for(5)
        assert items == [
            ("batch", "w", first),
            ("batch", "w", first + 1),
            ("lost", "w"),
            ("batch", "w", first),
            ("batch", "w", first + 1),
        ]


def test_a_replay_endpoint_that_never_answers_times_out(worker, monkeypatch):
    from kvblocks.pool import zmq_subscriber

    monkeypatch.setattr(zmq_subscriber, "REPLAY_TIMEOUT_S", 0.3)
    silent = zmq.Context.instance().socket(zmq.ROUTER)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    recorder = Recorder()
    try:
        with ZmqSubscriber(recorder, check_every=5) as subscriber:
            start = time.monotonic()
            subscriber.follow("w", worker.endpoint, f"tcp://127.0.0.1:{port}")
            assert 0.25 < time.monotonic() - start < 5
            worker.send(0)  # seq 0 is the next one: delivered without a replay
            assert recorder.wait_for(1) == [("batch", "w", 0)]
    finally:
        silent.close(0)


def test_a_worker_silent_past_gone_after_is_lost_once_then_back(worker, monkeypatch):
    """A worker whose replay endpoint stops answering (a process that died without closing)
    is gone after ``gone_after`` seconds: lost once, and the index forgets its blocks; when
    it answers again, its new batches are read as usual."""
    from kvblocks.pool import zmq_subscriber

    monkeypatch.setattr(zmq_subscriber, "REPLAY_TIMEOUT_S", 0.1)
    index = KvIndex(BS)
    recorder = Recorder(index)

    with ZmqSubscriber(recorder, check_every=0.05, gone_after=0.6) as subscriber:
        subscriber.follow("w", worker.endpoint, worker.replay_endpoint)
        worker.send(0)
        recorder.wait_for(1)
        time.sleep(1.0)  # longer than gone_after, answering every replay: not gone
        assert recorder.items == [("batch", "w", 0)] and not subscriber.states()[0].gone
        assert index.overlaps_of([1])[0].blocks == 1
        worker.silent = True
        assert_gone_once(recorder, subscriber, index, not_before=0.5)
        worker.silent = False
        worker.send(1, publish=False)  # kept: the next replay brings it
        assert recorder.wait_for(3)[2] == ("batch", "w", 1)
        state = subscriber.states()[0]
        assert not state.gone and state.lost == 1
        assert index.overlaps_of([2])[0].blocks == 1


def assert_gone_once(recorder: Recorder, subscriber, index: KvIndex, not_before: float) -> None:
    """Worker "w", which delivered batch 0 (block 1) and is silent from now on, is lost no
    sooner than ``not_before`` seconds from now, once, is shown gone, and ``index`` forgets
    its block."""
    start = time.monotonic()
    assert recorder.wait_for(2) == [("batch", "w", 0), ("lost", "w")]
    assert time.monotonic() - start > not_before
    assert subscriber.states()[0].gone
    assert index.overlaps_of([1])[0].blocks == 0
    time.sleep(0.5)  # still silent: lost only once
    assert recorder.items == [("batch", "w", 0), ("lost", "w")]


def test_without_gone_after_a_silent_worker_is_kept(worker, monkeypatch):
    from kvblocks.pool import zmq_subscriber

    monkeypatch.setattr(zmq_subscriber, "REPLAY_TIMEOUT_S", 0.1)
    recorder = Recorder()
    with ZmqSubscriber(recorder, check_every=0.05, gone_after=None) as subscriber:
        subscriber.follow("w", worker.endpoint, worker.replay_endpoint)
        worker.send(0)
        recorder.wait_for(1)
        worker.silent = True
        time.sleep(1.0)
        assert recorder.items == [("batch", "w", 0)]
        assert not subscriber.states()[0].gone


@pytest.mark.parametrize("gone_after", [0, -1.0, float("nan")])
def test_gone_after_must_be_positive(gone_after):
    with pytest.raises(InvalidArgumentError, match="gone_after must be > 0 seconds or None"):
        ZmqSubscriber(Recorder(), gone_after=gone_after)


def test_a_sink_that_raises_does_not_stop_the_others(worker, caplog):
    other = FakeWorker()
    recorder = Recorder()

    class Picky:
        def apply(self, w, batch):
            if w == "bad":
                raise RuntimeError("sink bug")
            recorder.apply(w, batch)

        def lost(self, w):
            recorder.lost(w)

    try:
        with caplog.at_level(logging.ERROR), ZmqSubscriber(Picky()) as subscriber:
            worker.send(0)
            other.send(0)
            subscriber.follow("bad", worker.endpoint, worker.replay_endpoint)
            subscriber.follow("good", other.endpoint, other.replay_endpoint)
            assert recorder.wait_for(1) == [("batch", "good", 0)]
            other.send(1)
            assert recorder.wait_for(2)[1] == ("batch", "good", 1)
        assert "sink failed" in caplog.text
    finally:
        other.close()


def test_follow_and_unfollow_name_their_errors(worker):
    recorder = Recorder()
    subscriber = ZmqSubscriber(recorder)
    try:
        subscriber.follow("w", worker.endpoint, worker.replay_endpoint)
        with pytest.raises(InvalidArgumentError, match="worker.*followed already"):
            subscriber.follow("w", worker.endpoint)
        with pytest.raises(InvalidArgumentError, match="endpoint"):
            subscriber.follow("x", "nonsense://here")
        with pytest.raises(InvalidArgumentError, match="replay_endpoint"):
            subscriber.follow("y", worker.endpoint, "nonsense://here")
        with pytest.raises(InvalidArgumentError, match="worker"):
            subscriber.follow("", worker.endpoint)
        with pytest.raises(InvalidArgumentError, match="worker.*not followed"):
            subscriber.unfollow("x")
        assert [s.worker for s in subscriber.states()] == ["w"]
        subscriber.unfollow("w")
        worker.send(0)
        time.sleep(0.2)
        assert recorder.items == [] and subscriber.states() == []
        with pytest.raises(InvalidArgumentError, match="check_every"):
            ZmqSubscriber(recorder, check_every=0)
    finally:
        subscriber.close()
    subscriber.close()
    with pytest.raises(InvalidArgumentError, match="closed"):
        subscriber.follow("z", worker.endpoint)


def test_all_blocks_cleared_travels_too(worker):
    index = KvIndex(BS)
    with ZmqSubscriber(index) as subscriber:
        subscriber.follow("w", worker.endpoint, worker.replay_endpoint)
        worker.send(0)
        wait_until(lambda: [o.blocks for o in index.overlaps_of([1])] == [1])
        worker.send(1, payload=encode_batch(EventBatch(1.0, (AllBlocksCleared(),))))
        wait_until(lambda: [o.blocks for o in index.overlaps_of([1])] == [0])
