"""KvIndex: which worker caches which prefix, from KV events; vLLM's event forms read back."""

import hashlib
import random

import pytest
import torch

from kvblocks.errors import InvalidArgumentError
from kvblocks.pool import (
    AllBlocksCleared,
    BlockManager,
    BlockRemoved,
    BlockStored,
    EventBatch,
    InProcessPublisher,
    Tier,
    sequence_hashes,
)
from kvblocks.pool.kv_index import KvIndex, Overlap
from tests.test_manager import BS, make_config, store

TIERS = (Tier.G1, Tier.G2, Tier.G3)


def true_overlap(worker: str, cached: dict[Tier, set], keys: list) -> Overlap:
    """The overlap a worker whose tiers cache ``cached`` has with a prompt of ``keys``."""
    by_tier = dict.fromkeys(TIERS, 0)
    n = 0
    for key in keys:
        held = [t for t in TIERS if key in cached[t]]
        if not held:
            break
        by_tier[held[0]] += 1
        n += 1
    return Overlap(worker, n, {t: c for t, c in by_tier.items() if c})


def assert_overlaps(index: KvIndex, truth: dict[str, dict[Tier, set]], keys, prompt=None):
    """The index's overlaps with a prompt (``(tokens, salt)``, or its ``keys`` when None)
    are those of ``truth`` (worker -> tier -> cached keys), best first."""
    got = index.overlaps(prompt[0], salt=prompt[1]) if prompt else index.overlaps_of(keys)
    expected = [true_overlap(w, cached, keys) for w, cached in truth.items()]
    assert sorted(got, key=lambda o: o.worker) == sorted(expected, key=lambda o: o.worker)
    blocks = [o.blocks for o in got]
    assert blocks == sorted(blocks, reverse=True)


def test_index_of_three_managers_matches_what_their_tiers_cache(tmp_path):
    """Three workers (G1 8, G2 12, G3 40 blocks) serve random prompts over shared prefixes; the
    index fed their events agrees with their pools on every prompt's overlap, per tier."""
    rng = random.Random(5)
    gen = torch.Generator().manual_seed(5)
    index = KvIndex(BS)
    managers = {}
    for name in ("a", "b", "c"):
        publisher = InProcessPublisher()
        publisher.subscribe(lambda batch, name=name: index.apply(name, batch))
        (tmp_path / name).mkdir()
        managers[name] = BlockManager(make_config(tmp_path / name), publisher=publisher)
    prefixes = [[rng.randrange(1000) for _ in range(BS * rng.randint(1, 6))] for _ in range(5)]
    prompts = []
    try:
        for _ in range(60):
            tokens = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randint(0, 13))]
            prompts.append(tokens)
            store(managers[rng.choice("abc")], tokens, gen)
        for m in managers.values():
            m.flush()
        truth = {
            name: {t: set(m.pool(t).cached_hashes()) for t in TIERS} for name, m in managers.items()
        }
        assert all(truth[w][Tier.G3] for w in truth), "the workload should reach G3"
        for tokens in prompts + prefixes:
            assert_overlaps(index, truth, sequence_hashes(tokens, BS), (tokens, 0))
        for view in index.workers():
            assert view.blocks == {t: len(truth[view.worker][t]) for t in TIERS}
            assert view.skipped == 0 and view.lost == 0 and view.batches > 0
    finally:
        for m in managers.values():
            m.close()


class Engine:
    """A worker whose hashes are its own (a seeded SHA-256 chain, as engines that hash per
    process do): stores and evicts random chains in two tiers and emits the events."""

    def __init__(self, seed: int, rng: random.Random) -> None:
        self.seed = seed.to_bytes(8, "big")
        self.rng = rng
        self.cached = {t: {} for t in TIERS}  # tier -> engine hash -> kvblocks hash

    def hashes(self, tokens, salt=0):
        ours = sequence_hashes(tokens, BS, salt=salt)
        theirs, parent = [], self.seed + salt.to_bytes(8, "big")
        for i in range(len(ours)):
            parent = hashlib.sha256(
                parent + bytes(str(tokens[i * BS : (i + 1) * BS]), "ascii")
            ).digest()
            theirs.append(parent)
        return theirs, ours

    def store(self, tokens, tier, salt=0) -> list:
        """Events that store ``tokens`` ' blocks in ``tier`` (a run per missing stretch)."""
        theirs, ours = self.hashes(tokens, salt)
        events, run = [], []
        for i, (h, k) in enumerate(zip(theirs, ours, strict=True)):
            if h in self.cached[tier]:
                if run:
                    events.append(self._stored(run, theirs, tokens, tier, salt))
                run = []
                continue
            self.cached[tier][h] = k
            run.append(i)
        if run:
            events.append(self._stored(run, theirs, tokens, tier, salt))
        return events

    def _stored(self, run, theirs, tokens, tier, salt):
        first = run[0]
        return BlockStored(
            tuple(theirs[i] for i in run),
            theirs[first - 1] if first else None,
            tuple(tokens[first * BS : (run[-1] + 1) * BS]),
            BS,
            tier,
            salt or None,
        )

    def evict(self, tier, n) -> BlockRemoved:
        gone = self.rng.sample(sorted(self.cached[tier]), min(n, len(self.cached[tier])))
        for h in gone:
            del self.cached[tier][h]
        return BlockRemoved(tuple(gone), tier)

    def truth(self) -> dict[Tier, set]:
        return {t: set(self.cached[t].values()) for t in TIERS}


def test_rehash_keys_blocks_by_their_tokens_whatever_the_engine_hashes():
    """Two engines with different hash seeds store and evict random chains (some salted) in
    G1 and G2; a rehashing index matches prompts by their tokens for both, per tier."""
    rng = random.Random(11)
    engines = {"e0": Engine(1, rng), "e1": Engine(2, rng)}
    index = KvIndex(BS, rehash=True)
    prefixes = [[rng.randrange(50) for _ in range(BS * rng.randint(1, 5))] for _ in range(6)]
    prompts = []
    for step in range(300):
        name = rng.choice(sorted(engines))
        engine = engines[name]
        if rng.random() < 0.7:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randint(0, 12))]
            salt = rng.choice([0, 0, 0, 7])
            prompts.append((tokens, salt))
            events = engine.store(tokens, rng.choice([Tier.G1, Tier.G2]), salt)
        else:
            events = [engine.evict(rng.choice([Tier.G1, Tier.G2]), rng.randint(1, 4))]
        index.apply(name, EventBatch(float(step), tuple(events)))
    truth = {name: e.truth() for name, e in engines.items()}
    assert all(truth[w][Tier.G1] and truth[w][Tier.G2] for w in truth)
    for tokens, salt in prompts:
        assert_overlaps(index, truth, sequence_hashes(tokens, BS, salt=salt), (tokens, salt))
    for view in index.workers():
        assert view.blocks == {t: len(truth[view.worker][t]) for t in TIERS}
        assert view.skipped == 0


def test_rehash_skips_a_stretch_whose_parent_it_does_not_know():
    index = KvIndex(BS, rehash=True)
    tokens = list(range(3 * BS))
    stored = BlockStored((b"x", b"y"), b"unknown", tuple(tokens[BS:]), BS, Tier.G1)
    index.apply("w", EventBatch(0.0, (stored,)))
    first = BlockStored((b"p",), None, tuple(tokens[:BS]), BS, Tier.G1)
    short = BlockStored((b"q", b"r"), b"p", tuple(tokens[BS : 2 * BS]), BS, Tier.G1)
    index.apply("w", EventBatch(1.0, (first, short)))
    (view,) = index.workers()
    assert view.skipped == 4 and view.blocks[Tier.G1] == 1
    assert index.overlaps(tokens) == [Overlap("w", 1, {Tier.G1: 1})]


def test_exact_mode_reads_removals_clears_and_lost_workers():
    index = KvIndex(BS)
    a = sequence_hashes(list(range(12)), BS)
    index.apply(
        "w1", EventBatch(0.0, (BlockStored(tuple(a), None, tuple(range(12)), BS, Tier.G1),))
    )
    index.apply(
        "w2", EventBatch(0.0, (BlockStored(tuple(a[:2]), None, tuple(range(8)), BS, Tier.G2),))
    )
    index.apply(
        "w1", EventBatch(0.5, (BlockStored(tuple(a[1:]), a[0], tuple(range(4, 12)), BS, Tier.G1),))
    )
    assert index.workers()[0].blocks[Tier.G1] == 3  # stored again: still 3 blocks
    assert [(o.worker, o.blocks, dict(o.by_tier)) for o in index.overlaps(range(14))] == [
        ("w1", 3, {Tier.G1: 3}),
        ("w2", 2, {Tier.G2: 2}),
    ]
    index.apply(
        "w1", EventBatch(1.0, (BlockStored(tuple(a[:1]), None, tuple(range(4)), BS, Tier.G3),))
    )
    index.apply("w1", EventBatch(2.0, (BlockRemoved((a[1],), Tier.G1),)))
    assert index.overlaps(range(12))[0] == Overlap("w2", 2, {Tier.G2: 2})
    assert index.overlaps(range(12))[1] == Overlap("w1", 1, {Tier.G1: 1})
    index.apply("w1", EventBatch(3.0, (BlockRemoved((a[0],), Tier.G1),)))
    assert index.overlaps(range(4))[1] == Overlap("w1", 1, {Tier.G3: 1})
    index.apply("w2", EventBatch(4.0, (AllBlocksCleared(),)))
    assert {o.worker: o.blocks for o in index.overlaps(range(12))} == {"w1": 1, "w2": 0}
    index.lost("w1")
    assert {o.worker: o.blocks for o in index.overlaps(range(12))} == {"w1": 0, "w2": 0}
    views = {v.worker: v for v in index.workers()}
    assert views["w1"].lost == 1 and views["w1"].blocks == dict.fromkeys(TIERS, 0)
    assert views["w1"].batches == 5 and views["w2"].batches == 2
    index.remove_worker("w2")
    assert [v.worker for v in index.workers()] == ["w1"]
    with pytest.raises(InvalidArgumentError, match="worker"):
        index.remove_worker("w2")


def test_blocks_of_another_size_or_tier_are_skipped_not_indexed():
    index = KvIndex(BS)
    h = tuple(sequence_hashes(list(range(8)), 2 * BS))
    index.apply("w", EventBatch(0.0, (BlockStored(h, None, tuple(range(8)), 2 * BS, Tier.G1),)))
    h4 = tuple(sequence_hashes(list(range(4)), BS))
    index.apply("w", EventBatch(0.0, (BlockStored(h4, None, tuple(range(4)), BS, Tier.G4),)))
    (view,) = index.workers()
    assert view.skipped == 2 and sum(view.blocks.values()) == 0
    assert index.overlaps_of(list(h)) == [Overlap("w", 0, {})]
    with pytest.raises(InvalidArgumentError, match="block_size"):
        KvIndex(0)
    with pytest.raises(InvalidArgumentError, match="worker"):
        index.apply("", EventBatch(0.0, ()))


def test_vllm_map_form_with_bytes_hashes_and_extra_fields_reads_back():
    """vLLM's newer batches are msgspec maps: tagged events with fields after ``medium``
    (left out when default), bytes hashes and a None medium."""
    msgspec = pytest.importorskip("msgspec")
    from kvblocks.pool.publishers import decode_batch

    class Batch(msgspec.Struct, omit_defaults=True):
        ts: float
        events: list
        data_parallel_rank: int | None = None

    class Event(msgspec.Struct, omit_defaults=True, tag=True):
        pass

    class Stored(Event, tag="BlockStored"):
        block_hashes: list[bytes | int]
        parent_block_hash: bytes | int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list | None = None
        group_idx: int | None = None

    class Removed(Event, tag="BlockRemoved"):
        block_hashes: list[bytes | int]
        medium: str | None
        group_idx: int | None = None

    class Cleared(Event, tag="AllBlocksCleared"):
        pass

    rng = random.Random(3)
    hashes = [rng.randbytes(32) for _ in range(3)]
    tokens = [rng.randrange(2**31) for _ in range(3 * BS)]
    wire = Batch(
        12.5,
        [
            Stored(hashes, None, tokens, BS, None, None, "adapter", [None] * 3, 0),
            Stored([7], hashes[-1], tokens[:BS], BS, 3, "CPU", None),
            Removed(hashes[:1], "GPU", 0),
            Cleared(),
        ],
        2,
    )
    batch = decode_batch(msgspec.msgpack.encode(wire))
    assert batch == EventBatch(
        12.5,
        (
            BlockStored(tuple(hashes), None, tuple(tokens), BS, Tier.G1),
            BlockStored((7,), hashes[-1], tuple(tokens[:BS]), BS, Tier.G2, 3),
            BlockRemoved((hashes[0],), Tier.G1),
            AllBlocksCleared(),
        ),
        2,
    )
    index = KvIndex(BS, rehash=True)
    index.apply("vllm", EventBatch(0.0, batch.events[:1]))
    assert index.overlaps(tokens) == [Overlap("vllm", 3, {Tier.G1: 3})]


@pytest.mark.parametrize(
    "wire",
    [
        [1.0, [["BlockStored", [1], None]]],
        [1.0, [["Nonsense", [1]]]],
        {"ts": 1.0},
        [1.0, [{"type": "BlockRemoved", "block_hashes": [1], "medium": "TAPE"}]],
    ],
)
def test_malformed_batches_are_refused(wire):
    from kvblocks.errors import SerializationError

    with pytest.raises(SerializationError, match="not a KV event batch"):
        EventBatch.from_wire(wire)
