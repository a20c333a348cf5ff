"""KV event transports (ZMQ in vLLM's protocol, NATS) and Prometheus metrics."""

import asyncio
import time
import urllib.request

import pytest

from kvblocks.pool import (
    AllBlocksCleared,
    BlockManager,
    BlockManagerConfig,
    BlockRemoved,
    BlockStored,
    EventBatch,
    Tier,
    prometheus_registry,
    serve_metrics,
)

zmq = pytest.importorskip("zmq")
pytest.importorskip("msgpack")

from kvblocks.pool.publishers import NatsPublisher, ZmqPublisher, decode_batch  # noqa: E402
from tests.helpers import free_port  # noqa: E402

BATCH = EventBatch(
    1700000000.25,
    (
        BlockStored((11, 2**63 + 5), None, tuple(range(8)), 4, Tier.G1),
        BlockStored((12,), 2**63 + 5, (8, 9, 10, 11), 4, Tier.G2),
        BlockRemoved((11,), Tier.G1),
        AllBlocksCleared(),
    ),
)


def test_payload_decodes_with_vllm_event_types():
    """The msgpack payload decodes with vLLM's own event classes (redeclared here as vLLM
    declares them: tagged, array-like msgspec structs)."""
    msgspec = pytest.importorskip("msgspec")

    class EventBatchV(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        ts: float
        events: list

    class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
        pass

    class BlockStoredV(KVCacheEvent, tag="BlockStored"):
        block_hashes: list[int]
        parent_block_hash: int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None

    class BlockRemovedV(KVCacheEvent, tag="BlockRemoved"):
        block_hashes: list[int]
        medium: str | None

    class AllBlocksClearedV(KVCacheEvent, tag="AllBlocksCleared"):
        pass

    class KVEventBatch(EventBatchV):
        events: list[BlockStoredV | BlockRemovedV | AllBlocksClearedV]

    from kvblocks.pool.publishers import encode_batch

    decoded = msgspec.msgpack.Decoder(type=KVEventBatch).decode(encode_batch(BATCH))
    assert decoded.ts == BATCH.ts
    stored, child, removed, cleared = decoded.events
    assert stored.block_hashes == [11, 2**63 + 5] and stored.parent_block_hash is None
    assert stored.token_ids == list(range(8)) and stored.block_size == 4
    assert stored.medium == "GPU" and stored.lora_id is None
    assert child.parent_block_hash == 2**63 + 5 and child.medium == "CPU"
    assert removed.block_hashes == [11] and removed.medium == "GPU"
    assert isinstance(cleared, AllBlocksClearedV)


def test_zmq_publisher_speaks_the_vllm_protocol():
    port, replay_port = free_port(), free_port()
    publisher = ZmqPublisher(
        f"tcp://127.0.0.1:{port}", replay_endpoint=f"tcp://127.0.0.1:{replay_port}"
    )
    context = zmq.Context.instance()
    sub = context.socket(zmq.SUB)
    sub.connect(f"tcp://127.0.0.1:{port}")
    sub.setsockopt_string(zmq.SUBSCRIBE, "kv-events")
    try:
        received = []
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:  # PUB drops until SUB has joined
            publisher.publish(BATCH)
            if sub.poll(100):
                received.append(sub.recv_multipart())
        assert received, "no batch arrived"
        topic, seq, payload = received[0]
        assert topic == b"kv-events" and len(seq) == 8
        assert decode_batch(payload) == BATCH
        first_seen = int.from_bytes(seq, "big")

        dealer = context.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{replay_port}")
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        replayed = []
        while dealer.poll(5000):
            _, seq, payload = dealer.recv_multipart()
            if not payload:
                assert int.from_bytes(seq, "big", signed=True) == -1
                break
            replayed.append((int.from_bytes(seq, "big"), decode_batch(payload)))
        assert [s for s, _ in replayed] == list(range(first_seen + 1))  # every batch, in order
        assert all(batch == BATCH for _, batch in replayed)
        dealer.close(0)
    finally:
        sub.close(0)
        publisher.close()


def test_zmq_publisher_names_a_bad_endpoint():
    from kvblocks.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="endpoint"):
        ZmqPublisher("nonsense://here")


def test_nats_publisher_against_a_real_server(nats_server, tmp_path):
    import nats

    got: list[EventBatch] = []

    async def listen(ready, stop):
        client = await nats.connect(nats_server)
        sub = await client.subscribe("kv-events")
        ready.set()
        while not stop.is_set():
            try:
                message = await sub.next_msg(timeout=0.1)
            except nats.errors.TimeoutError:
                continue
            got.append(decode_batch(message.data))
        await client.close()

    import threading

    ready, stop = threading.Event(), threading.Event()
    listener = threading.Thread(target=lambda: asyncio.run(listen(ready, stop)))
    listener.start()
    assert ready.wait(10)
    config = BlockManagerConfig(
        num_layers=2, num_kv_heads=2, head_dim=16, block_size=4, device_blocks=8
    )
    with NatsPublisher(nats_server) as publisher, BlockManager(config, publisher=publisher) as m:
        blocks = m.allocate(2)
        hashes = m.register(blocks, list(range(8)))
        m.free(blocks)
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    listener.join()
    assert got and got[0].events == (BlockStored(tuple(hashes), None, tuple(range(8)), 4, Tier.G1),)


def test_nats_publisher_reports_no_server():
    pytest.importorskip("nats")
    from kvblocks.errors import TransferError

    with pytest.raises(TransferError, match="NATS"):
        NatsPublisher(f"nats://127.0.0.1:{free_port()}", connect_timeout=0.5)


def test_prometheus_metrics_and_endpoint(tmp_path):
    pytest.importorskip("prometheus_client")
    block = BlockManagerConfig(num_layers=2, num_kv_heads=2, head_dim=16, block_size=4).block_bytes
    config = BlockManagerConfig(
        num_layers=2,
        num_kv_heads=2,
        head_dim=16,
        block_size=4,
        device_blocks=8,
        enable_offload=True,
        host_cache_gb=16 * block / 2**30,
        offload_path=str(tmp_path),
    )
    with BlockManager(config) as manager:
        registry = prometheus_registry(manager.metrics)
        tokens = list(range(12))
        blocks = manager.allocate(3)
        manager.register(blocks, tokens)
        held = manager.allocate(2)
        manager.free(blocks)
        manager.flush()
        manager.free(manager.allocate(8 - 2))  # evicts the 3 cached G1 blocks
        hit = manager.lookup(tokens + [1, 2, 3, 4])  # 3 from G2, 1 miss

        def value(name, **labels):
            return registry.get_sample_value(name, labels)

        assert value("kvbm_blocks_allocated", tier="GPU") == 2 + 3
        assert value("kvbm_blocks_free", tier="GPU") == 8 - 5
        assert value("kvbm_blocks_cached", tier="CPU") == 3
        assert value("kvbm_allocation_latency_count") == 3
        assert value("kvbm_eviction_count_total", tier="GPU") == 3
        assert value("kvbm_hits_total", tier="CPU") == 3
        assert value("kvbm_misses_total") == 1
        assert value("kvbm_offload_blocks_total", src="GPU", dst="CPU") == 3
        assert value("kvbm_onboard_bytes_total", src="CPU", dst="GPU") == 3 * block
        assert value("kvbm_transfer_latency_count", src="GPU", dst="CPU") == 1
        server = serve_metrics(registry, 0)
        try:
            url = f"http://127.0.0.1:{server.server_port}/metrics"
            text = urllib.request.urlopen(url, timeout=10).read().decode()
        finally:
            server.shutdown()
        assert 'kvbm_blocks_allocated{tier="GPU"} 5.0' in text
        assert "kvbm_allocation_latency_bucket" in text
        manager.free(hit.block_ids + held)


def test_fan_out_publisher_publishes_to_all_and_closes_all():
    from kvblocks.errors import InvalidArgumentError
    from kvblocks.pool import EventPublisher, FanOutPublisher

    class Recording(EventPublisher):
        def __init__(self, fails: bool) -> None:
            self.batches, self.closed, self.fails = [], False, fails

        def publish(self, batch):
            self.batches.append(batch)

        def close(self):
            self.closed = True
            if self.fails:
                raise OSError("socket went away")

    parts = [Recording(fails=True), Recording(fails=False)]
    fan = FanOutPublisher(parts)
    batches = [EventBatch(float(i), (BlockRemoved((i,), Tier.G1),)) for i in range(3)]
    for batch in batches:
        fan.publish(batch)
    assert [p.batches for p in parts] == [batches, batches]
    with pytest.raises(OSError, match="went away"):
        fan.close()
    assert all(p.closed for p in parts)
    for bad in ([], [parts[0], "tcp://x"]):
        with pytest.raises(InvalidArgumentError, match="publishers"):
            FanOutPublisher(bad)
