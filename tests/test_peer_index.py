"""A peer's G2 as its news says: the Announcer and PeerIndex on their own, over ZMQ, with the
snapshot given by the test. Raw PUB sockets play servers that drop or garble messages."""

import random
import time

import pytest

from kvblocks.errors import InvalidArgumentError, PeerError
from kvblocks.pool import peer_index
from kvblocks.pool.peer_index import BEAT_S, Announcer, PeerIndex
from kvblocks.pool.sharing import _news_endpoint_beside, _reachable

zmq = pytest.importorskip("zmq")
msgpack = pytest.importorskip("msgpack")

SERVER = 0x1234_5678_9ABC_DEF0
LOCAL = "tcp://127.0.0.1:*"


class Snapshots:
    """A snapshot function over a set the test changes; counts its calls."""

    def __init__(self, hashes=(), seq=0, fails=False) -> None:
        self.hashes, self.seq, self.fails, self.calls = set(hashes), seq, fails, 0

    def __call__(self):
        self.calls += 1
        if self.fails:
            raise PeerError("the peer did not answer")
        return self.seq, sorted(self.hashes)


def follow(endpoint: str, snapshots: Snapshots, server: int = SERVER, wait: float = 2.0):
    return PeerIndex(endpoint, server, snapshots, wait, zmq, msgpack)


def settled(index: PeerIndex, hashes, n, news: Announcer | None = None) -> bool:
    """Whether the index says ``n`` of ``hashes`` within 5 seconds (``news`` beating
    meanwhile, as its server does)."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if news is not None:
            news.beat()
        index.refresh()
        if index.prefix(hashes) == n:
            return True
        time.sleep(0.005)
    return False


class RawServer:
    """A PUB socket sending the news frames as the test says, and beating meanwhile."""

    def __init__(self, server: int = SERVER) -> None:
        self.socket = zmq.Context.instance().socket(zmq.PUB)
        self.socket.bind(LOCAL)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.server = server

    def send(self, seq: int, payload: bytes, server: int | None = None) -> None:
        frames = ((server or self.server).to_bytes(8, "big"), seq.to_bytes(8, "big"), payload)
        self.socket.send_multipart(frames)

    def changes(self, seq: int, changes, server: int | None = None) -> None:
        self.send(seq, msgpack.packb([[s, list(h)] for s, h in changes]), server)

    def beat_until(self, index: PeerIndex, seq: int, done) -> None:
        """Beat (as change ``seq``) until ``done()`` or 5 s."""
        deadline = time.monotonic() + 5.0
        while not done():
            assert time.monotonic() < deadline
            self.send(seq, b"")
            index.refresh()
            time.sleep(0.01)

    def close(self) -> None:
        self.socket.close(0)


def test_an_index_follows_announced_changes_in_order():
    rng = random.Random(0)
    snapshots = Snapshots({1, 2, 3})
    news = Announcer(LOCAL, SERVER, zmq, msgpack)
    try:
        index = follow(news.endpoint, snapshots)
        assert settled(index, [1, 2, 3, 4], 3, news) and snapshots.calls == 1
        truth = {1, 2, 3}
        for _ in range(200):  # random stores and removals, several per message
            changes = []
            for _ in range(rng.randint(1, 4)):
                hashes = tuple(rng.sample(range(1, 40), rng.randint(1, 5)))
                stored = rng.random() < 0.5
                changes.append((stored, hashes))
                truth = truth | set(hashes) if stored else truth - set(hashes)
            news.announce(changes)
        assert news.seq == 200
        chain = sorted(truth)
        assert settled(index, [h for h in range(1, 40) if h in truth] + [0], len(chain), news)
        for h in range(1, 40):
            assert index.prefix([h]) == (h in truth)
        assert index.lacks(range(1, 40)) == [h not in truth for h in range(1, 40)]
        assert snapshots.calls == 1  # nothing was missed
        index.close()
        assert index.prefix([1]) is None and index.lacks([1]) is None
    finally:
        news.close()


def test_a_removal_after_a_store_in_one_message_wins_and_the_other_way_round():
    news = Announcer(LOCAL, SERVER, zmq, msgpack)
    try:
        index = follow(news.endpoint, Snapshots())
        assert settled(index, [1], 0, news)
        news.announce([(True, (1, 2)), (False, (1,))])
        news.announce([(False, (3,)), (True, (3,))])
        assert settled(index, [3, 2], 2, news)
        assert index.prefix([1]) == 0
    finally:
        news.close()


def test_a_missed_change_or_beat_takes_a_new_snapshot():
    raw = RawServer()
    try:
        snapshots = Snapshots({1}, seq=2)
        index = follow(raw.endpoint, snapshots, wait=0.0)
        raw.beat_until(index, 2, lambda: index.prefix([1]) == 1)
        assert snapshots.calls == 1
        raw.changes(2, [(True, (9,))])  # the snapshot holds it already: ignored
        raw.changes(3, [(True, (2,))])
        assert settled(index, [1, 2], 2)
        snapshots.hashes, snapshots.seq = {5, 6}, 7
        raw.changes(5, [(True, (3,))])  # 4 was missed
        assert settled(index, [5, 6], 2) and snapshots.calls == 2
        assert index.prefix([1]) == 0 and index.prefix([3]) == 0
        snapshots.hashes, snapshots.seq = {8}, 9
        raw.send(9, b"")  # a beat says 8 and 9 were missed
        assert settled(index, [8], 1) and snapshots.calls == 3
    finally:
        raw.close()


def test_an_index_is_unknown_until_its_first_message_and_when_snapshots_fail():
    raw = RawServer()
    try:
        snapshots = Snapshots({1}, fails=True)
        index = follow(raw.endpoint, snapshots, wait=0.05)
        assert index.prefix([1]) is None and snapshots.calls == 0  # nothing heard yet
        raw.beat_until(index, 1, lambda: snapshots.calls > 0)
        assert index.prefix([1]) is None
        snapshots.fails = False
        raw.beat_until(index, 1, lambda: index.prefix([1]) == 1)
    finally:
        raw.close()


def test_bye_another_server_or_silence_make_an_index_unknown(monkeypatch):
    for ending in ("bye", "another server", "silence"):
        raw = RawServer()
        try:
            index = follow(raw.endpoint, Snapshots({1}), wait=0.0)
            raw.beat_until(index, 0, lambda i=index: i.prefix([1]) == 1)
            if ending == "bye":
                raw.send(0, b"bye")
            elif ending == "another server":
                raw.changes(1, [(True, (2,))], server=SERVER + 1)
            else:
                monkeypatch.setattr(peer_index, "SILENT_S", 0.05)
                time.sleep(0.1)
            deadline = time.monotonic() + 5.0
            while index.prefix([1]) is not None:
                assert time.monotonic() < deadline, ending
                index.refresh()
                time.sleep(0.01)
            raw.send(0, b"")  # a beat from the server said bye to does not bring it back
            time.sleep(0.05)
            index.refresh()
            assert (index.prefix([1]) is None) == (ending != "silence"), ending
        finally:
            raw.close()
            monkeypatch.undo()


def test_an_announcer_beats_and_says_bye():
    news = Announcer(LOCAL, SERVER, zmq, msgpack)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(news.endpoint)
    try:
        deadline = time.monotonic() + 5.0
        while not sub.poll(10):  # the subscription takes a moment to reach the PUB socket
            assert time.monotonic() < deadline
            news.beat()
        sub.recv_multipart()
        news.announce([(True, (7,))])
        news.beat()
        news.close()
        got = [sub.recv_multipart() for _ in range(3)]
        server = SERVER.to_bytes(8, "big")
        assert got[0] == [server, (1).to_bytes(8, "big"), msgpack.packb([[True, [7]]])]
        assert got[1] == [server, (1).to_bytes(8, "big"), b""]
        assert got[2] == [server, (1).to_bytes(8, "big"), b"bye"]
        assert BEAT_S < peer_index.SILENT_S
    finally:
        sub.close(0)


def test_news_endpoints():
    assert _news_endpoint_beside("tcp://*:5600") == "tcp://*:*"
    assert _news_endpoint_beside("tcp://10.0.0.7:5600") == "tcp://10.0.0.7:*"
    assert _news_endpoint_beside("ipc:///tmp/kv") == "ipc:///tmp/kv.news"
    with pytest.raises(InvalidArgumentError, match="news_endpoint"):
        _news_endpoint_beside("ws://host:80")
    assert _reachable("tcp://0.0.0.0:41000", "tcp://prefill-7:5600") == "tcp://prefill-7:41000"
    assert _reachable("tcp://[::]:41000", "tcp://10.1.2.3:5600") == "tcp://10.1.2.3:41000"
    assert _reachable("tcp://10.0.0.7:41000", "tcp://gateway:5600") == "tcp://10.0.0.7:41000"
    assert _reachable("ipc:///tmp/kv.news", "ipc:///tmp/kv") == "ipc:///tmp/kv.news"
    with pytest.raises(InvalidArgumentError, match="news_endpoint"):
        Announcer("tcp://nowhere:1", SERVER, zmq, msgpack)


def test_an_announcer_drops_what_comes_after_close():
    news = Announcer(LOCAL, SERVER, zmq, msgpack)
    news.close()
    news.announce([(True, (1,))])  # an offload finishing while its manager closes
    news.beat()
    assert news.seq == 1
