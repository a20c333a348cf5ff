"""Sharing cached blocks between workers (tier G4): the protocol on its own, then BlockManagers
in this process, each with its own NIXL agent, reading each other's G2 on lookups."""

import dataclasses
import importlib.util
import logging
import random
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace

import pytest
import torch

from kvblocks.benchmarks.peers import wait_for_news
from kvblocks.demo import count_mismatches, g1_regions, write_pattern
from kvblocks.errors import (
    BackendUnavailableError,
    ConfigMismatchError,
    InvalidArgumentError,
    PeerError,
    TransferError,
)
from kvblocks.pool import (
    WITHOUT_DISK,
    WITHOUT_PEERS,
    BlockManager,
    BlockStored,
    ReadSplit,
    Tier,
    g4,
    prefetch,
    prometheus_registry,
    read_split,
    sequence_hashes,
    skip_slow_reads,
)
from kvblocks.pool.sharing import (
    MAX_LEASE_S,
    VERSION,
    BlockChain,
    BlockServer,
    BlockShape,
    PeerClient,
)
from kvblocks.remote import nixl_available
from kvblocks.transfer import block_checksums
from tests.helpers import assert_bits_equal, bits
from tests.test_manager import (
    BS,
    check_all_pools,
    evict_g1,
    flip_g3_byte,
    make_config,
    recording_publisher,
    tokens_of,
    write_random,
)
from tests.test_onboard_from import MIXED, g2_and_g3

pytest.importorskip("zmq")
pytest.importorskip("msgpack")
needs_nixl = pytest.mark.skipif(not nixl_available(), reason="NIXL is not installed")

SHAPE = BlockShape(2, 2, BS, 2, 16, "bf16")
LOCAL = "tcp://127.0.0.1:*"


class FakeTier:
    """A G2 stand-in for the server: hashes 1..n cached as blocks 100+h; holds counted;
    reservations get blocks 200, 201, ... for hashes it does not cache."""

    def __init__(self, cached: int) -> None:
        self.num_cached = cached
        self.held: list[int] = []
        self.committed: list[tuple[int, BlockChain]] = []
        self.abandoned: list[int] = []
        self._next = 200

    def reserve(self, chains):
        blocks = []
        for c in chains:
            blocks.append(-1 if 1 <= c.seq_hash <= self.num_cached else self._next)
            self._next += blocks[-1] >= 0
        return blocks

    def commit(self, blocks, chains):
        self.committed += zip(blocks, chains, strict=True)

    def abandon(self, blocks):
        self.abandoned += blocks

    def lease(self, hashes):
        blocks = []
        for h in hashes:
            if not 1 <= h <= self.num_cached:
                break
            blocks.append(100 + h)
        self.held += blocks
        return blocks

    def release(self, blocks):
        for b in blocks:
            self.held.remove(b)

    def cached(self):
        return list(range(1, self.num_cached + 1))


@pytest.fixture
def served():
    """(server, client, tier) over a fake tier caching hashes 1..5."""
    tier = FakeTier(5)
    server = BlockServer(LOCAL, SHAPE, b"layout", tier, stores=True)
    client = PeerClient(server.endpoint, timeout=2.0)
    yield server, client, tier
    client.close()
    server.close()


def test_hello_lease_and_release(served):
    server, client, tier = served
    info = client.hello()
    assert (info.shape, info.layout, info.server) == (SHAPE, b"layout", server.info.server)
    assert info.stores and info.news == server.info.news
    assert client.holds() == (0, [1, 2, 3, 4, 5])
    server.announce([(False, (5,))])
    assert client.holds() == (1, [1, 2, 3, 4, 5])  # changes are announced after they happen
    lease = client.lease([1, 2, 3, 9, 4], 5.0)
    assert lease.block_ids == (101, 102, 103) and lease.server == info.server
    assert tier.held == [101, 102, 103] and server.num_leases == 1
    empty = client.lease([7, 1], 5.0)
    assert (empty.lease_id, empty.block_ids) == (0, ())
    client.release(lease)
    client.release(empty)
    assert tier.held == [] and server.num_leases == 0


def test_reserve_commit_and_abandon(served):
    server, client, tier = served
    chains = [BlockChain(h, h - 1 or None, (h,) * BS) for h in (1, 7, 8)]
    kept = client.reserve(chains, 5.0)
    assert kept.block_ids == (-1, 200, 201) and server.num_leases == 1
    client.commit(kept)
    assert tier.committed == [(200, chains[1]), (201, chains[2])] and server.num_leases == 0
    dropped = client.reserve(chains[1:2], 5.0)
    client.release(dropped)
    lapsed = client.reserve(chains[2:], 0.05)
    deadline = time.monotonic() + 5
    while len(tier.abandoned) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert tier.abandoned == [202, 203] and server.num_leases == 0
    with pytest.raises(PeerError, match="no reservation"):
        client.commit(lapsed)
    assert len(tier.committed) == 2
    with pytest.raises(PeerError, match="chains must be"):
        client._request(["reserve", [[1, None, "abc"]], 1.0], 4)


def test_a_server_that_does_not_store_refuses_reservations():
    tier = FakeTier(0)
    server = BlockServer(LOCAL, SHAPE, b"", tier)
    client = PeerClient(server.endpoint, timeout=2.0)
    try:
        assert not client.hello().stores
        with pytest.raises(PeerError, match="does not store"):
            client.reserve([BlockChain(5, None, (1,) * BS)], 1.0)
    finally:
        client.close()
        server.close()


def test_a_lease_expires_and_close_lets_every_lease_go():
    tier = FakeTier(5)
    server = BlockServer(LOCAL, SHAPE, b"", tier)
    client = PeerClient(server.endpoint, timeout=2.0)
    try:
        client.lease([1, 2], 0.1)
        client.lease([1], MAX_LEASE_S * 10)  # outlives the test: close lets it go
        assert len(tier.held) == 3
        deadline = time.monotonic() + 5
        while len(tier.held) > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert tier.held == [101] and server.num_leases == 1
    finally:
        client.close()
        server.close()
    assert tier.held == []


@pytest.mark.parametrize(
    "request_, problem",
    [
        (["hello", VERSION + 1], "protocol version"),
        (["lease", [-1], 1.0], "unsigned 64-bit"),
        (["lease", [1], 0], "> 0 seconds"),
        (["steal", 1], "unknown request"),
    ],
)
def test_bad_requests_are_answered_with_errors(served, request_, problem):
    server, client, tier = served
    with pytest.raises(PeerError, match=problem):
        client._request(request_, 1)
    assert client.lease([1], 1.0).block_ids == (101,)  # the server still answers
    assert tier.held == [101]


def test_a_request_that_is_not_from_a_req_socket_is_ignored(served):
    import zmq

    server, client, tier = served
    stray = zmq.Context.instance().socket(zmq.DEALER)
    stray.setsockopt(zmq.LINGER, 0)
    stray.connect(server.endpoint)
    stray.send(b"no empty frame")
    assert client.lease([1, 2], 1.0).block_ids == (101, 102)
    assert not stray.poll(200)  # nothing was sent back
    stray.close(0)


def test_a_server_that_does_not_answer_times_out():
    client = PeerClient("tcp://127.0.0.1:9", timeout=0.2)
    start = time.monotonic()
    with pytest.raises(PeerError, match="did not answer within 0.2 s"):
        client.hello()
    assert time.monotonic() - start < 2
    client.close()


def test_client_and_server_check_their_arguments():
    with pytest.raises(InvalidArgumentError, match="endpoint"):
        PeerClient("localhost:5600")
    with pytest.raises(InvalidArgumentError, match="timeout"):
        PeerClient(LOCAL, timeout=0)
    with pytest.raises(InvalidArgumentError, match="endpoint"):
        BlockServer("nowhere", SHAPE, b"", FakeTier(1))


def test_block_shape_names_the_first_difference(tmp_path):
    shape = BlockShape.of(make_config(tmp_path))
    assert shape == SHAPE and shape.difference(SHAPE) is None
    other = replace(SHAPE, head_dim=32)
    assert shape.difference(other) == "head_dim: 16 here, 32 at the peer"


# BlockManagers sharing blocks ------------------------------------------------------------


def worker(tmp_path, publisher=None, **overrides) -> BlockManager:
    directory = tmp_path / uuid.uuid4().hex[:8]
    directory.mkdir()
    config = make_config(directory, g3=0, nixl_backend="UCX", **overrides)
    return BlockManager(config, publisher=publisher)


def poison_g1(manager: BlockManager) -> None:
    for t in manager.device_tensors:
        bits(t).fill_(-1)


def g1_blocks(manager: BlockManager, blocks: list[int]) -> list[torch.Tensor]:
    index = torch.tensor(blocks, dtype=torch.long, device=manager.device_tensors[0].device)
    return [t[index].cpu() for t in manager.device_tensors]


def store(manager: BlockManager, tokens: list[int], gen: torch.Generator) -> list[torch.Tensor]:
    """Write random KV for ``tokens`` (whole blocks) into G1, register, free, wait for the
    offload to G2. Returns the blocks' KV per layer."""
    blocks = manager.allocate(len(tokens) // BS)
    write_random(manager, blocks, gen)
    manager.register(blocks, tokens)
    kv = g1_blocks(manager, blocks)
    manager.free(blocks)
    manager.flush()
    return kv


def assert_g1_holds(manager: BlockManager, blocks: list[int], kv: list[torch.Tensor]) -> None:
    """G1 ``blocks`` of ``manager`` hold ``kv`` (per layer, as :func:`store` returns it), bit
    for bit."""
    for got, want in zip(g1_blocks(manager, blocks), kv, strict=True):
        assert_bits_equal(got, want)


def held(manager: BlockManager, tier: Tier) -> int:
    return manager.pool(tier).num_in_use


def let_go(server: BlockManager, timeout: float = 5.0) -> bool:
    """Whether ``server`` holds no block for a peer within ``timeout`` seconds (releases are
    sent while the lookup returns)."""
    deadline = time.monotonic() + timeout
    while server._server.num_leases or held(server, Tier.G2):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@needs_nixl
@pytest.mark.parametrize("local_blocks", [0, 2])
def test_lookup_reads_the_rest_of_a_prefix_from_a_peer(tmp_path, local_blocks):
    gen = torch.Generator().manual_seed(local_blocks)
    publisher, batches = recording_publisher()
    tokens = tokens_of(1, 6 * BS + 3)
    with worker(tmp_path) as there, worker(tmp_path, publisher) as here:
        kv = store(there, tokens[: 6 * BS], gen)
        if local_blocks:  # the first blocks are cached here too (in G2), with the same KV
            blocks = here.allocate(local_blocks)
            for t, layer in zip(here.device_tensors, kv, strict=True):
                t[torch.tensor(blocks, device=t.device)] = layer[:local_blocks].to(t.device)
            here.register(blocks, tokens[: local_blocks * BS])
            here.free(blocks)
            here.flush()
            evict_g1(here)
        here.add_peer(there.serve(LOCAL))
        assert here.peers == [there._server.endpoint]
        poison_g1(here)
        batches.clear()

        hit = here.lookup(tokens)

        expected = {Tier.G1: 0, Tier.G2: local_blocks, Tier.G4: 6 - local_blocks}
        assert {t: n for t, n in hit.from_tier.items() if n or t is Tier.G1} == {
            t: n for t, n in expected.items() if n or t is Tier.G1
        }
        assert len(hit.block_ids) == 6 and hit.misses == 0
        assert_g1_holds(here, hit.block_ids, kv)
        hashes = sequence_hashes(tokens, BS)
        assert all(here.pool(Tier.G2).lookup(h) is not None for h in hashes)
        assert let_go(there)
        here.free(hit.block_ids)
        assert held(here, Tier.G2) == 0 and held(here, Tier.G1) == 0
        stored = [e for b in batches for e in b.events if isinstance(e, BlockStored)]
        in_g2 = [e for e in stored if e.tier is Tier.G2]
        assert [h for e in in_g2 for h in e.block_hashes] == hashes[local_blocks:]
        assert in_g2[0].parent_block_hash == (hashes[local_blocks - 1] if local_blocks else None)
        assert list(in_g2[0].token_ids) == tokens[local_blocks * BS : 6 * BS]
        assert here.metrics.hits[Tier.G4] == 6 - local_blocks
        assert here.metrics.onboard_blocks[(Tier.G4, Tier.G2)] == 6 - local_blocks
        if importlib.util.find_spec("prometheus_client"):
            from prometheus_client import generate_latest

            text = generate_latest(prometheus_registry(here.metrics)).decode()
            assert f'kvbm_hits_total{{tier="REMOTE"}} {6.0 - local_blocks}' in text
            assert 'kvbm_onboard_blocks_total{dst="CPU",src="REMOTE"}' in text

        again = here.lookup(tokens)  # now cached here
        assert again.from_tier == {Tier.G1: 6}
        here.free(again.block_ids)


@needs_nixl
def test_a_sliding_window_lookup_reads_from_a_peer_and_holds_only_the_window(tmp_path):
    gen = torch.Generator().manual_seed(9)
    tokens = tokens_of(9, 6 * BS + 1)
    with worker(tmp_path) as there, worker(tmp_path, sliding_window=2 * BS) as here:
        kv = store(there, tokens[: 6 * BS], gen)
        here.add_peer(there.serve(LOCAL))
        poison_g1(here)

        hit = here.lookup(tokens)

        assert (hit.skipped, len(hit.block_ids), hit.misses) == (4, 2, 0)
        assert hit.from_tier == {Tier.G1: 0, Tier.G4: 2}
        assert_g1_holds(here, hit.block_ids, [layer[4:] for layer in kv])
        assert here.metrics.onboard_blocks[(Tier.G2, Tier.G1)] == 2
        assert let_go(there)
        here.free(hit.block_ids)
        assert held(here, Tier.G2) == 0 and held(here, Tier.G1) == 0


@needs_nixl
def test_a_lookup_that_leaves_out_g3_asks_a_peer_for_what_only_g3_has_here(tmp_path):
    gen = torch.Generator().manual_seed(12)
    tokens = tokens_of(12, 6 * BS)
    config = make_config(tmp_path, g2=6, g3=32, nixl_backend="UCX")
    with worker(tmp_path) as there, BlockManager(config) as here:
        kv = store(there, tokens, gen)
        blocks = here.allocate(6)  # the same KV here, pushed out of G2 onto G3 only
        for t, layer in zip(here.device_tensors, kv, strict=True):
            t[torch.tensor(blocks, device=t.device)] = layer.to(t.device)
        here.register(blocks, tokens)
        here.free(blocks)
        here.flush()
        store(here, tokens_of(13, 6 * BS), gen)
        evict_g1(here)
        assert here.locate(tokens) == [Tier.G3] * 6
        here.add_peer(there.serve(LOCAL))
        poison_g1(here)

        hit = here.lookup(tokens, onboard_from={Tier.G2})  # no disk, no peers: nothing
        assert (hit.block_ids, hit.misses, here.metrics.peer_requests) == ([], 6, 0)

        hit = here.lookup(tokens, onboard_from={Tier.G2, Tier.G4})

        assert hit.from_tier == {Tier.G1: 0, Tier.G4: 6} and here.metrics.peer_requests == 1
        assert here.metrics.onboard_blocks[(Tier.G3, Tier.G2)] == 0
        assert_g1_holds(here, hit.block_ids, kv)
        assert let_go(there)
        here.free(hit.block_ids)


@needs_nixl
def test_reading_from_a_peer_does_not_evict_the_prefix_it_extends(tmp_path):
    """G2 here is full and its least recently used blocks are the local prefix: staging the
    peer's blocks must evict other blocks, not those."""
    gen = torch.Generator().manual_seed(6)
    tokens = tokens_of(6, 6 * BS)
    with worker(tmp_path) as there, worker(tmp_path) as here:
        kv = store(there, tokens, gen)
        store(here, tokens[: 2 * BS], gen)
        for seed in (60, 61):  # 10 newer blocks fill here's G2 of 12
            store(here, tokens_of(seed, 5 * BS), gen)
        evict_g1(here)
        assert here.pool(Tier.G2).num_cached == 12
        here.add_peer(there.serve(LOCAL))
        poison_g1(here)
        hit = here.lookup(tokens)
        assert {t: n for t, n in hit.from_tier.items() if n} == {Tier.G2: 2, Tier.G4: 4}
        got = g1_blocks(here, hit.block_ids)
        for layer_got, layer_kv in zip(got, kv, strict=True):
            assert_bits_equal(layer_got[2:], layer_kv[2:])
        here.free(hit.block_ids)
        assert held(here, Tier.G2) == 0


_CHILD_WORKER = """
import sys, torch
from kvblocks.pool import BlockManager, BlockManagerConfig, Tier
from kvblocks.transfer import block_checksums
config = BlockManagerConfig(**{config})
tokens = list(range(100, 100 + 4 * config.block_size))
with BlockManager(config) as manager:
    blocks = manager.allocate(4)
    gen = torch.Generator().manual_seed(7)
    for t in manager.device_tensors:
        kv = torch.randn((4, *t.shape[1:]), generator=gen).to(t.dtype).to(t.device)
        t[torch.tensor(blocks, device=t.device)] = kv
    manager.register(blocks, tokens)
    sums = block_checksums(manager.layout(Tier.G1), blocks)
    manager.free(blocks)
    manager.flush()
    print(manager.serve("tcp://127.0.0.1:*"), *sums, flush=True)
    sys.stdin.readline()
"""


@needs_nixl
def test_a_peer_in_another_process(tmp_path):
    config = make_config(tmp_path, g3=0, nixl_backend="UCX")
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    # the child takes the defaults of the fields whose repr is not Python
    fields.update(dtype="bf16", device_format=None, device_layout=None, storage_format=None)
    fields = {name: value for name, value in fields.items() if value is not None}
    code = _CHILD_WORKER.replace("{config}", repr(fields))
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        endpoint, *sums = child.stdout.readline().split()
        with BlockManager(config) as here:
            here.add_peer(endpoint, timeout=30)
            poison_g1(here)
            hit = here.lookup(list(range(100, 100 + 4 * BS)) + [1, 2])
            assert hit.from_tier == {Tier.G1: 0, Tier.G4: 4}
            assert block_checksums(here.layout(Tier.G1), hit.block_ids) == sums
            here.free(hit.block_ids)
    finally:
        child.stdin.write("\n")
        child.stdin.close()
        assert child.wait(timeout=60) == 0


def count_leases(peer: BlockManager, arrivals: list, delay: float = 0.0) -> None:
    """Append ``(peer, time)`` to ``arrivals`` for each lease request ``peer`` answers, after
    ``delay`` seconds."""
    served = peer._server._tier

    def counted(hashes, lease=served.lease):
        arrivals.append((peer, time.monotonic()))
        time.sleep(delay)
        return lease(hashes)

    served.lease = counted


@needs_nixl
def test_only_the_peer_whose_news_has_the_longest_prefix_is_asked(tmp_path):
    gen = torch.Generator().manual_seed(2)
    tokens = tokens_of(2, 5 * BS)
    arrivals = []
    with (
        worker(tmp_path) as empty,
        worker(tmp_path) as short,
        worker(tmp_path) as full,
        worker(tmp_path) as here,
    ):
        store(short, tokens[: 2 * BS], gen)
        kv = store(full, tokens, gen)
        for peer, n in ((empty, 0), (short, 2), (full, 5)):
            endpoint = peer.serve(LOCAL)
            count_leases(peer, arrivals)
            here.add_peer(endpoint, news=True)
            wait_for_news(here, endpoint, tokens, n)
        poison_g1(here)
        hit = here.lookup(tokens)
        assert [p for p, _ in arrivals] == [full]
        assert (here.metrics.peer_requests, here.metrics.peer_requests_spared) == (1, 2)
        assert hit.from_tier[Tier.G4] == 5
        assert_g1_holds(here, hit.block_ids, kv)
        assert let_go(full)
        here.free(hit.block_ids)

        nowhere = here.lookup(tokens_of(3, 4 * BS))  # no peer caches its first block
        assert nowhere.misses == 4 and len(arrivals) == 1
        assert (here.metrics.peer_requests, here.metrics.peer_requests_spared) == (1, 5)
        if importlib.util.find_spec("prometheus_client"):
            from prometheus_client import generate_latest

            text = generate_latest(prometheus_registry(here.metrics)).decode()
            assert "kvbm_peer_requests_total 1.0" in text
            assert "kvbm_peer_requests_spared_total 5.0" in text


@needs_nixl
def test_peers_not_followed_are_asked_at_once(tmp_path):
    """Both peers are asked at once (each takes 0.5 s to answer here: their requests arrive
    together); the longer answer wins and the other lease is let go."""
    gen = torch.Generator().manual_seed(2)
    tokens = tokens_of(2, 5 * BS)
    arrivals = []
    with worker(tmp_path) as short, worker(tmp_path) as full, worker(tmp_path) as here:
        store(short, tokens[: 2 * BS], gen)
        kv = store(full, tokens, gen)
        for peer in (short, full):
            endpoint = peer.serve(LOCAL)
            count_leases(peer, arrivals, delay=0.5)
            here.add_peer(endpoint)
        poison_g1(here)
        hit = here.lookup(tokens)
        assert len(arrivals) == 2 and abs(arrivals[1][1] - arrivals[0][1]) < 0.25
        assert hit.from_tier[Tier.G4] == 5
        assert_g1_holds(here, hit.block_ids, kv)
        for other in (short, full):
            assert let_go(other)
        here.free(hit.block_ids)


@needs_nixl
def test_blocks_offloaded_to_a_peer_that_stores_are_served_to_others(tmp_path):
    """A worker offloads to a peer that stores (a shared cache); a third worker, which knows
    only that peer, gets the blocks from it, bit for bit."""
    gen = torch.Generator().manual_seed(7)
    tokens = tokens_of(7, 5 * BS)
    publisher, batches = recording_publisher()
    with (
        worker(tmp_path, publisher) as cache,
        worker(tmp_path) as writer,
        worker(tmp_path) as reader,
    ):
        endpoint = cache.serve(LOCAL, stores=True)
        writer.add_peer(endpoint, offload=True)
        reader.add_peer(endpoint, news=True)
        kv = store(writer, tokens, gen)
        assert let_go(cache)
        hashes = sequence_hashes(tokens, BS)
        g2 = [cache.pool(Tier.G2).lookup(h) for h in hashes]
        assert None not in g2
        assert block_checksums(cache.layout(Tier.G2), g2) == block_checksums(
            writer.layout(Tier.G2), [writer.pool(Tier.G2).lookup(h) for h in hashes]
        )
        stored = [e for b in batches for e in b.events if isinstance(e, BlockStored)]
        assert [h for e in stored for h in e.block_hashes] == hashes
        assert stored[0].parent_block_hash is None and list(stored[0].token_ids) == tokens
        assert writer.metrics.offload_blocks[(Tier.G2, Tier.G4)] == 5
        store(writer, tokens, gen)  # the cache has them: nothing is written again
        assert writer.metrics.offload_blocks[(Tier.G2, Tier.G4)] == 5

        wait_for_news(reader, endpoint, tokens, 5)  # the cache announces what it takes
        poison_g1(reader)
        hit = reader.lookup(tokens)
        assert hit.from_tier[Tier.G4] == 5
        assert_g1_holds(reader, hit.block_ids, kv)
        reader.free(hit.block_ids)
        assert let_go(cache)


@needs_nixl
def test_news_follows_what_a_peer_stores_and_evicts(tmp_path):
    gen = torch.Generator().manual_seed(9)
    tokens = tokens_of(9, 4 * BS)
    with worker(tmp_path) as there, worker(tmp_path) as here:
        store(there, tokens[: 2 * BS], gen)  # before: the snapshot has them
        endpoint = there.serve(LOCAL)
        here.add_peer(endpoint, news=True)
        assert here.peer_prefixes(tokens) == {endpoint: 2}
        store(there, tokens, gen)  # after: the news has them
        wait_for_news(here, endpoint, tokens, 4)
        there.clear()
        wait_for_news(here, endpoint, tokens, 0)
        assert here.lookup(tokens).misses == 4
        assert here.metrics.peer_requests == 0


@needs_nixl
def test_a_lookup_asks_the_peer_it_names_whatever_its_news_says(tmp_path):
    """A prefill worker stored the prompt and the decode worker looks it up before the news
    came (here: it never comes): only ``ask_peer`` finds it."""
    gen = torch.Generator().manual_seed(13)
    tokens = tokens_of(13, 3 * BS)
    with worker(tmp_path) as prefill, worker(tmp_path) as decode:
        endpoint = prefill.serve(LOCAL)
        decode.add_peer(endpoint, news=True)
        prefill._server.announce = lambda changes: None  # the news is late
        kv = store(prefill, tokens, gen)
        assert decode.peer_prefixes(tokens) == {endpoint: 0}
        assert decode.lookup(tokens).misses == 3 and decode.metrics.peer_requests == 0
        with pytest.raises(InvalidArgumentError, match="ask_peer"):
            decode.lookup(tokens, ask_peer="tcp://127.0.0.1:9")
        poison_g1(decode)
        hit = decode.lookup(tokens, ask_peer=endpoint)
        assert hit.from_tier[Tier.G4] == 3 and decode.metrics.peer_requests == 1
        assert_g1_holds(decode, hit.block_ids, kv)
        decode.free(hit.block_ids)


def mixed_here_and_at_a_peer(tmp_path, seed: int):
    """``here``: G1 16, G2 8 and G3 32 blocks, caching a prompt's first 7 blocks as
    :data:`~tests.test_onboard_from.MIXED` says (G2, G3 for blocks 3 to 5); a peer caching all
    10 blocks of the prompt in G2, whose news ``here`` follows. Returns (here, the peer, its
    endpoint, the prompt, the checksum of each of here's blocks by hash, the peer's KV per
    layer)."""
    here, tokens, expected = g2_and_g3(tmp_path, seed, g1=16, nixl_backend="UCX")
    tokens += tokens_of(seed + 1, 3 * BS)
    there = worker(tmp_path, g1=16, g2=16)
    kv = store(there, tokens, torch.Generator().manual_seed(seed))
    endpoint = there.serve(LOCAL)
    here.add_peer(endpoint, news=True)
    wait_for_news(here, endpoint, tokens, 10)
    return here, there, endpoint, tokens, expected, kv


@needs_nixl
def test_a_lookup_reads_the_disks_blocks_while_the_peers_are_read(tmp_path, monkeypatch):
    """Blocks 3 to 5 in G3 only here, 6 in G2, 7 on at the peer: while the peer's block (G2's
    8 blocks leave room for one) waits at a gate, the disk's come into G2; once the gate
    opens, the lookup returns the whole prefix, every block as cached."""
    here, there, _, tokens, expected, kv = mixed_here_and_at_a_peer(tmp_path, 45)
    with here, there:
        poison_g1(here)
        gate = threading.Event()
        read = g4.PeerReads._read

        def gated(peer_reads, *args):
            assert gate.wait(10), "the test left the gate of the peer's reads shut"
            return read(peer_reads, *args)

        monkeypatch.setattr(g4.PeerReads, "_read", gated)
        hits = []
        lookup = threading.Thread(target=lambda: hits.append(here.lookup(tokens)))
        lookup.start()
        deadline = time.monotonic() + 5
        while here.metrics.onboard_blocks[(Tier.G3, Tier.G2)] < 3:
            assert time.monotonic() < deadline, "the disk was not read beside the peer"
            time.sleep(0.005)
        assert lookup.is_alive()
        gate.set()
        lookup.join(timeout=10)
        (hit,) = hits
        assert hit.from_tier == {Tier.G1: 0, Tier.G2: 4, Tier.G3: 3, Tier.G4: 1}
        assert hit.misses == 2
        sums = block_checksums(here.layout(Tier.G1), hit.block_ids[:7])
        assert sums == [expected[h] for h in hit.hashes[:7]]
        assert_g1_holds(here, hit.block_ids[7:], [t[7:8] for t in kv])
        here.free(hit.block_ids)
        assert let_go(there)
        assert held(here, Tier.G2) == 0


@needs_nixl
def test_a_bad_disk_block_ends_the_prefix_before_the_peers_blocks_read_beside_it(tmp_path):
    """Block 4's G3 copy is corrupt: the lookup ends its prefix there; the peer's block, read
    meanwhile, is not held (it stays cached in G2 for a later lookup)."""
    here, there, _, tokens, expected, _ = mixed_here_and_at_a_peer(tmp_path, 46)
    with here, there:
        hashes = sequence_hashes(tokens, BS)
        flip_g3_byte(here, hashes[4], 5)
        poison_g1(here)
        hit = here.lookup(tokens)
        assert hit.from_tier == {Tier.G1: 0, Tier.G2: 3, Tier.G3: 1}
        assert hit.misses == 6 and here.metrics.corrupt_blocks == 1
        sums = block_checksums(here.layout(Tier.G1), hit.block_ids)
        assert sums == [expected[h] for h in hit.hashes]
        assert here.metrics.onboard_blocks[(Tier.G4, Tier.G2)] == 1
        assert here.locate(tokens)[7] is Tier.G2
        here.free(hit.block_ids)
        assert let_go(there)
        assert held(here, Tier.G2) == 0


@needs_nixl
def test_read_split_counts_the_blocks_a_peer_caches_after_the_local_ones(tmp_path, monkeypatch):
    """Blocks 0 to 6 as MIXED, 7 to 9 at the peer: the split from block 3 weighs the disk's
    blocks and the peer's, each at its rate and both read at once, against computing."""
    here, there, endpoint, tokens, _, _ = mixed_here_and_at_a_peer(tmp_path, 61)
    with here, there:
        assert here.locate(tokens) == [*MIXED, None, None, None]
        assert here.peer_prefixes(tokens, first_block=7) == {endpoint: 3}
        assert here.peer_prefixes(tokens, first_block=12) == {endpoint: 0}
        with pytest.raises(InvalidArgumentError, match="first_block"):
            here.peer_prefixes(tokens, first_block=-1)
        block = here.block_bytes

        def split(blocks_per_s, disk=1.0, peer=1.0):  # rates in blocks per second
            disk, peer = disk and disk * block, peer and peer * block
            return read_split(
                here, tokens, blocks_per_s * BS, disk_bytes_per_s=disk, peer_bytes_per_s=peer
            )

        # Blocks read and computed in 1 s each, prefetches holding 4 blocks at most: compute
        # 3 to 5, read G2's 6 (free) and the peer's 7 to 9.
        assert split(1.0) == ReadSplit(3, 6, 10, 3.0, 3.0)
        # Computing 4x as fast: compute 3 to 8, past the local blocks, and read the peer's 9.
        assert split(4.0) == ReadSplit(3, 9, 10, 1.5, 1.0)
        # The peer as fast as computing: compute 3 to 5, read the peer's 7 to 9 in 0.75 s.
        assert split(4.0, peer=4.0) == ReadSplit(3, 6, 10, 0.75, 0.75)
        assert split(1.0, peer=None) == ReadSplit(3, 3, 10, 0.0, None)  # peer's rate unknown
        assert split(1.0, disk=None) == ReadSplit(3, 3, 10, 0.0, None)  # disk's rate unknown
        here.metrics.record_transfer(Tier.G4, Tier.G2, 1, 4 * block, 1.0, True)  # measured
        assert split(4.0, peer=None) == ReadSplit(3, 6, 10, 0.75, 0.75)
        assert split(4.0, peer=1.0) == ReadSplit(3, 6, 10, 0.75, 0.75)  # the measured rate counts
        with pytest.raises(InvalidArgumentError, match="peer_bytes_per_s"):
            split(1.0, peer=-1.0)
        # Prefetches may hold all of G2 (8 blocks): computing 4x as slow, read everything,
        # the disk's 3 blocks (3 s) and at once the peer's (0.75 s, as measured): 3 s.
        monkeypatch.setattr(prefetch, "PREFETCH_SHARE", 1)
        assert split(0.25, peer=None) == ReadSplit(3, 3, 10, 0.0, 3.0)


@needs_nixl
@pytest.mark.parametrize(
    ("disk_s", "peer_s", "choice"),
    [
        (1.0, 1.0, None),  # read 3 and 3 blocks at once in 3 s, or compute 3 to 9 in 14 s
        (1.0, 4.0, WITHOUT_PEERS),  # read 3 blocks, compute 7 to 9: 9 s
        (4.0, 1.0, WITHOUT_DISK),  # the peer brings 3 to 9 in 7 s
        (4.0, 5.0, frozenset({Tier.G2})),  # compute 3 to 9: 14 s (read both: 15 s)
        (4.0, None, WITHOUT_DISK),  # the peers' rate is not known: read them to measure it
    ],
)
def test_skip_slow_reads_weighs_the_disk_and_the_peers_against_computing(
    tmp_path, disk_s, peer_s, choice
):
    """Blocks 0 to 6 as MIXED here, 0 to 9 at the peer, a block computed in 2 s, read from
    the disk in ``disk_s`` and from the peer in ``peer_s``: leaving G3 out, the peer is asked
    for the blocks from 3 on; the way that brings the prefix back soonest is chosen."""
    here, there, _, tokens, expected, kv = mixed_here_and_at_a_peer(tmp_path, 64)
    with here, there:
        block = here.block_bytes
        peer_rate = None if peer_s is None else block / peer_s
        got = skip_slow_reads(
            here, tokens, BS / 2.0, disk_bytes_per_s=block / disk_s, peer_bytes_per_s=peer_rate
        )
        assert got == choice
        poison_g1(here)
        hit = here.lookup(tokens, onboard_from=got)  # as far as G2's 8 blocks make room
        n = len(hit.block_ids)
        peer_from = {None: 7, WITHOUT_DISK: 3}.get(got, n)  # the blocks from here on: G4's
        if got is None or Tier.G4 in got:
            assert n > peer_from
        else:  # the prefix ends where the local tiers read from do
            assert n == (7 if got == WITHOUT_PEERS else 3)
        assert hit.from_tier.get(Tier.G4, 0) == n - peer_from
        assert_g1_holds(here, hit.block_ids[peer_from:], [t[peer_from:n] for t in kv])
        here_sums = block_checksums(here.layout(Tier.G1), hit.block_ids[:3])
        assert here_sums == [expected[h] for h in hit.hashes[:3]]
        here.free(hit.block_ids)
        assert let_go(there)


@needs_nixl
@pytest.mark.parametrize(
    ("blocks_per_s", "read_from", "read"),
    [(1.0, 6, {Tier.G2: 1, Tier.G4: 3}), (4.0, 9, {Tier.G4: 1})],
)
def test_a_split_prefix_comes_back_from_here_from_the_engine_and_from_the_peer(
    tmp_path, blocks_per_s, read_from, read
):
    """As ``read_split`` says: the engine computes blocks 3 to ``read_from`` while the
    prefetch reads the rest from the peer (and holds G2's block 6); the lookup after both
    finds the whole prefix in G1 and G2, the peer's blocks as the peer computed them."""
    here, there, _, tokens, expected, kv = mixed_here_and_at_a_peer(tmp_path, 62)
    with here, there:
        block = here.block_bytes
        split = read_split(
            here, tokens, blocks_per_s * BS, disk_bytes_per_s=block, peer_bytes_per_s=block
        )
        assert (split.compute_from, split.read_from, split.end) == (3, read_from, 10)
        poison_g1(here)
        # The head first: the prefetch's reads into a full G2 may evict its blocks.
        head = here.lookup(tokens, max_blocks=split.compute_from, onboard_from=WITHOUT_DISK)
        assert head.from_tier == {Tier.G1: 0, Tier.G2: 3}
        with here.prefetch(tokens, first_block=split.read_from) as fetch:
            computed = here.allocate(read_from - 3)  # the engine computes blocks 3 on meanwhile
            write_random(here, computed, torch.Generator().manual_seed(63))
            here.register(computed, tokens[3 * BS : read_from * BS], parent_hash=head.last_hash)
            computed_kv = g1_blocks(here, computed)
            assert fetch.wait(timeout=10) == read
            hit = here.lookup(tokens, onboard_from={Tier.G2})
        assert hit.from_tier == {Tier.G1: read_from, Tier.G2: 10 - read_from}
        assert hit.block_ids[:read_from] == head.block_ids + computed
        assert_g1_holds(here, computed, computed_kv)
        from_g2 = [*range(3), *range(read_from, 7)]  # here's own G2 blocks
        sums = block_checksums(here.layout(Tier.G1), [hit.block_ids[i] for i in from_g2])
        assert sums == [expected[hit.hashes[i]] for i in from_g2]
        at_peer = hit.block_ids[max(read_from, 7) :]
        assert_g1_holds(here, at_peer, [layer[10 - len(at_peer) :] for layer in kv])
        assert let_go(there)
        here.free(head.block_ids + computed + hit.block_ids)
        here.flush()  # the offload of the computed blocks holds G2 blocks too
        assert held(here, Tier.G2) == 0 and held(here, Tier.G1) == 0


@needs_nixl
def test_a_peer_whose_news_cannot_be_heard_is_asked_on_every_miss(tmp_path, caplog):
    gen = torch.Generator().manual_seed(10)
    tokens = tokens_of(10, 3 * BS)
    with worker(tmp_path) as there, worker(tmp_path) as here:
        endpoint = there.serve(LOCAL)
        there._server.info = replace(there._server.info, news="tcp://127.0.0.1:9")  # nobody
        with caplog.at_level(logging.WARNING, logger="kvblocks.pool"):
            here.add_peer(endpoint, timeout=0.3, news=True)
        assert f"no news from {endpoint}" in caplog.text
        assert here.peer_prefixes(tokens) == {endpoint: None}
        kv = store(there, tokens, gen)
        poison_g1(here)
        hit = here.lookup(tokens)
        assert hit.from_tier[Tier.G4] == 3 and here.metrics.peer_requests == 1
        assert_g1_holds(here, hit.block_ids, kv)
        here.free(hit.block_ids)


@needs_nixl
@pytest.mark.parametrize("news", [False, True])
def test_blocks_a_cache_announced_are_not_offered_to_it_again(tmp_path, news):
    """The writer dropped its copies and stores the same blocks again: with the cache's news
    it does not even ask for a reservation; without, the reservation gives no block."""
    gen = torch.Generator().manual_seed(11)
    tokens = tokens_of(11, 5 * BS)
    with worker(tmp_path) as cache, worker(tmp_path) as writer:
        endpoint = cache.serve(LOCAL, stores=True)
        writer.add_peer(endpoint, offload=True, news=news)
        served, offered = cache._server._tier, []
        reserve = served.reserve
        served.reserve = lambda chains: offered.append(len(chains)) or reserve(chains)
        store(writer, tokens, gen)
        assert offered == [5]
        if news:
            wait_for_news(writer, endpoint, tokens, 5)
        writer.clear()
        store(writer, tokens, gen)
        assert offered == ([5] if news else [5, 5])
        assert writer.metrics.offload_blocks[(Tier.G2, Tier.G4)] == 5
        assert let_go(cache)


@needs_nixl
def test_offloading_to_a_peer_that_goes_away_loses_nothing_here(tmp_path, caplog):
    gen = torch.Generator().manual_seed(8)
    with worker(tmp_path) as here:
        cache = worker(tmp_path)
        here.add_peer(cache.serve(LOCAL, stores=True), timeout=0.3, offload=True)
        cache.close()
        with caplog.at_level(logging.WARNING, logger="kvblocks.pool"):
            store(here, tokens_of(8, 3 * BS), gen)  # flush raises nothing
        assert "did not answer" in caplog.text
        assert here.pool(Tier.G2).num_cached == 3 and held(here, Tier.G2) == 0


@needs_nixl
def test_a_failed_write_to_a_peer_leaves_nothing_there(tmp_path, monkeypatch, caplog):
    gen = torch.Generator().manual_seed(9)
    with worker(tmp_path) as cache, worker(tmp_path) as writer:
        writer.add_peer(cache.serve(LOCAL, stores=True), offload=True)
        peer_g2 = writer._peers.get(writer.peers[0]).handle
        execute = writer._transfer.execute_transfer

        def failing(src, src_ids, dst, dst_ids, options=None):
            if dst == peer_g2:
                raise TransferError("the wire broke")
            return execute(src, src_ids, dst, dst_ids, options)

        monkeypatch.setattr(writer._transfer, "execute_transfer", failing)
        with caplog.at_level(logging.WARNING, logger="kvblocks.pool"):
            store(writer, tokens_of(9, 3 * BS), gen)
        assert "the wire broke" in caplog.text
        assert let_go(cache, timeout=2.0)  # dropped at once, not after the lease time
        assert cache.pool(Tier.G2).num_cached == 0
        assert writer.pool(Tier.G2).num_cached == 3


@needs_nixl
def test_leased_blocks_are_not_evicted(tmp_path):
    gen = torch.Generator().manual_seed(3)
    tokens = tokens_of(3, 4 * BS)
    with worker(tmp_path, g1=20) as there:
        store(there, tokens, gen)
        client = PeerClient(there.serve(LOCAL), timeout=2.0)
        lease = client.lease(sequence_hashes(tokens, BS), 30.0)
        assert len(lease.block_ids) == 4
        for seed in range(10, 13):  # 12 more blocks through a G2 of 12: evictions
            store(there, tokens_of(seed, 4 * BS), gen)
        g2 = there.pool(Tier.G2)
        assert [g2.lookup(h) for h in sequence_hashes(tokens, BS)] == list(lease.block_ids)
        client.release(lease)
        assert held(there, Tier.G2) == 0
        client.close()


@needs_nixl
def test_a_peer_that_goes_away_is_a_miss_then_left_alone(tmp_path, caplog):
    gen = torch.Generator().manual_seed(4)
    tokens = tokens_of(4, 3 * BS)
    with worker(tmp_path) as here:
        there = worker(tmp_path)
        store(there, tokens, gen)
        here.add_peer(there.serve(LOCAL), timeout=0.3)
        there.close()
        with caplog.at_level(logging.WARNING, logger="kvblocks.pool"):
            hit = here.lookup(tokens)
        assert hit.block_ids == [] and hit.misses == 3
        assert "did not answer within 0.3 s" in caplog.text
        start = time.monotonic()
        assert here.lookup(tokens).misses == 3
        assert time.monotonic() - start < 0.2  # not asked again yet


@needs_nixl
@pytest.mark.parametrize("same_news", [False, True])
def test_a_restarted_peer_is_greeted_again(tmp_path, same_news):
    """Its news said bye (and, on the same news endpoint, comes from another server id): it is
    asked again, which greets it."""
    gen = torch.Generator().manual_seed(5)
    tokens = tokens_of(5, 3 * BS)
    news = f"ipc://{tmp_path}/news" if same_news else None
    with worker(tmp_path) as here:
        first = worker(tmp_path)
        endpoint = first.serve(LOCAL, news_endpoint=news)
        here.add_peer(endpoint, news=True)
        first.close()
        with worker(tmp_path) as second:
            kv = store(second, tokens, gen)
            second.serve(endpoint, news_endpoint=news)  # same address, new memory and agent
            poison_g1(here)
            hit = here.lookup(tokens)
            assert hit.from_tier[Tier.G4] == 3
            assert_g1_holds(here, hit.block_ids, kv)
            assert here._peers.get(endpoint).server == second._server.info.server
            here.free(hit.block_ids)


@needs_nixl
def test_sharing_checks_its_arguments(tmp_path):
    with worker(tmp_path) as here, worker(tmp_path, head_dim=32) as other:
        endpoint = here.serve(LOCAL)
        with pytest.raises(InvalidArgumentError, match="serves at"):
            here.serve(LOCAL)
        with pytest.raises(ConfigMismatchError, match="head_dim: 32 here, 16 at the peer"):
            other.add_peer(endpoint)
        assert other.peers == []
        with worker(tmp_path) as third:
            third.add_peer(endpoint)
            with pytest.raises(InvalidArgumentError, match="a peer already"):
                third.add_peer(endpoint)
            with pytest.raises(InvalidArgumentError, match="ask_peer.*leaves out G4"):
                third.lookup(list(range(2 * BS)), ask_peer=endpoint, onboard_from={Tier.G2})
            third.remove_peer(endpoint)
            with pytest.raises(InvalidArgumentError, match="not a peer"):
                third.remove_peer(endpoint)
        with pytest.raises(PeerError, match="did not answer"):
            here.add_peer("tcp://127.0.0.1:9", timeout=0.2)
        with worker(tmp_path) as fourth:
            with pytest.raises(InvalidArgumentError, match="does not store"):
                fourth.add_peer(endpoint, offload=True)
            assert fourth.peers == []
    with pytest.raises(InvalidArgumentError, match="nixl_backend"):
        make_config(tmp_path, nixl_backend="")


def test_sharing_needs_a_host_tier_and_a_nixl_agent(tmp_path):
    with BlockManager(make_config(tmp_path, g2=0, g3=0)) as g1_only:
        with pytest.raises(InvalidArgumentError, match="enable offload"):
            g1_only.serve(LOCAL)
    with BlockManager(make_config(tmp_path, g3=0)) as no_agent:
        with pytest.raises(BackendUnavailableError, match="nixl_backend"):
            no_agent.add_peer(LOCAL)


def test_info_says_what_sharing_needs(monkeypatch):
    from kvblocks import platform

    real = importlib.util.find_spec
    monkeypatch.setattr(
        platform.importlib.util, "find_spec", lambda name: None if name == "zmq" else real(name)
    )
    monkeypatch.setattr(platform, "installed_package", lambda: None)
    (sharing,) = [c for c in platform.probe() if c.name == "block sharing (G4)"]
    assert not sharing.available
    assert sharing.detail == "needs nixl (extra: remote), pyzmq (extra: events)"


@needs_nixl
@pytest.mark.parametrize("news", [False, True])
def test_concurrent_lookups_while_peers_store_and_evict(tmp_path, news):
    """Three workers, each the others' peer, each running requests from two threads at once
    (look up, compute the rest, register, free) over prefixes that overlap: every hit holds
    the KV computed for its hash, whichever tier or worker it came from, and when all is done
    no block is held anywhere. With ``news`` the peers are asked by what they announce."""
    prompts = [tokens_of(100 + p, 6 * BS) for p in range(4)]
    workers = [worker(tmp_path, g1=24) for _ in range(3)]
    errors = []
    try:
        endpoints = [w.serve(LOCAL) for w in workers]
        for w, mine in zip(workers, endpoints, strict=True):
            for endpoint in endpoints:
                if endpoint != mine:
                    w.add_peer(endpoint, timeout=5, news=news)
        for prompt in prompts[:2]:  # the others' first lookups of these find them in G4
            blocks = workers[0].allocate(6)
            write_pattern(g1_regions(workers[0]), blocks, sequence_hashes(prompt, BS))
            workers[0].register(blocks, prompt)
            workers[0].free(blocks)
        workers[0].flush()
        if news:
            for w in workers[1:]:
                for prompt in prompts[:2]:
                    wait_for_news(w, endpoints[0], prompt, 6)

        def requests(w: BlockManager, seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(8):
                    prompt = rng.choice(prompts)[: BS * rng.randint(2, 6)]
                    prompt = prompt + tokens_of(rng.randrange(10**6), BS * rng.randint(0, 2))
                    hit = w.lookup(prompt)
                    assert count_mismatches(g1_regions(w), hit.block_ids, hit.hashes) == 0
                    rest = w.allocate(len(prompt) // BS - len(hit.block_ids))
                    tokens = prompt[len(hit.block_ids) * BS :]
                    hashes = sequence_hashes(tokens, BS, parent=hit.last_hash)
                    write_pattern(g1_regions(w), rest, hashes)
                    w.register(rest, tokens, parent_hash=hit.last_hash)
                    w.free(hit.block_ids + rest)
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=requests, args=(w, 10 * i + j))
            for i, w in enumerate(workers)
            for j in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        for w in workers:
            w.flush()
        for w in workers:
            assert let_go(w)
            check_all_pools(w)
            assert held(w, Tier.G1) == 0
        assert sum(w.metrics.hits[Tier.G4] for w in workers) > 0
    finally:
        for w in workers:
            w.close()
