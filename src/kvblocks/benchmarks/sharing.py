"""Prefix lookups served by another worker (tier G4), against the parts they are made of;
and blocks offloaded to another worker.

Two BlockManagers in this process, each with its own NIXL agent (UCX), stand for two workers
on one host: ``there`` caches a prefix of ``num_blocks`` blocks in its G2 and serves it (and
stores what peers offload to it); ``here`` has it as a peer to read from and offload to.
Measured in the same run, wall clock, median of ``iters`` after ``warmup``:

- ``peer_lookup_ms``: ``here.lookup(tokens)`` with nothing cached here: a lease from the peer,
  one NIXL READ of its G2 blocks into here's G2, and the onboard into G1;
- ``peer_read_ms``: the NIXL READ within it (the G4 -> G2 copy, from here's metrics);
- ``local_lookup_ms``: the same lookup once the blocks are in here's G2 (the onboard alone);
- ``nixl_alone_ms``: NIXL itself reading the same bytes in one descriptor from the peer's G2
  into a pinned buffer here;
- ``peer_write_ms``: the NIXL WRITE of ``num_blocks`` new blocks from here's G2 into the
  peer's, when here stores them (its offload thread, between a reservation and a commit);
- ``nixl_alone_write_ms``: NIXL itself writing the same bytes in one descriptor.

``sharing_gbps`` is the prefix's bytes over ``peer_lookup_ms``; ``parts_gbps`` the same bytes
over ``local_lookup_ms + nixl_alone_ms``, what the lookup would take with no cost of its own
beyond its two copies; ``ratio`` is the first over the second. Every lookup's source tier is
checked, and the last one's bytes against the peer's.
"""

from __future__ import annotations

import random
import statistics
import time
import uuid
from dataclasses import dataclass

import torch

from kvblocks.benchmarks.remote import nixl_alone_gbps
from kvblocks.benchmarks.timing import progress
from kvblocks.layout import KvDims
from kvblocks.pool import BlockManager, BlockManagerConfig, Tier, sequence_hashes
from kvblocks.remote import NixlOp, load_api
from kvblocks.transfer import TransferManager, block_checksums


@dataclass(frozen=True)
class SharingRow:
    tokens_per_block: int
    num_blocks: int
    total_bytes: int
    peer_lookup_ms: float
    peer_read_ms: float
    local_lookup_ms: float
    nixl_alone_ms: float
    peer_write_ms: float
    nixl_alone_write_ms: float
    sharing_gbps: float
    parts_gbps: float
    ratio: float
    """``sharing_gbps / parts_gbps``."""


def nixl_transfer(name: str, device: int) -> TransferManager:
    builder = TransferManager.builder().agent_name(f"kvblocks-bench-{name}-{uuid.uuid4().hex[:6]}")
    return builder.nixl_backend("UCX").cuda_device_id(device).build()


def manager_config(dims: KvDims, num_blocks: int) -> BlockManagerConfig:
    return BlockManagerConfig.from_dims(
        dims,
        device_blocks=num_blocks,
        enable_offload=True,
        host_cache_gb=(num_blocks + 1) * dims.block_bytes / 2**30,
    )


def store_random(manager: BlockManager, tokens: list[int], block_size: int) -> list[int]:
    """Random KV for ``tokens`` in new G1 blocks, registered and offloaded; the blocks."""
    blocks = manager.allocate(len(tokens) // block_size)
    index = torch.tensor(blocks, device=manager.device_tensors[0].device)
    for t in manager.device_tensors:
        t[index] = torch.randn((len(blocks), *t.shape[1:]), device=t.device).to(t.dtype)
    manager.register(blocks, tokens)
    manager.free(blocks)
    manager.flush()
    return blocks


def _copy_seconds(manager: BlockManager, src: Tier, dst: Tier) -> float:
    """Seconds the manager's copies from ``src`` to ``dst`` took so far."""
    latency = manager.metrics.transfer_latency.get((src, dst))
    return latency.total if latency is not None else 0.0


def _timed_lookup(manager: BlockManager, tokens: list[int], source: Tier, expected: int):
    """The hit, the lookup's seconds and the seconds of its G4 -> G2 copies."""
    read_before = _copy_seconds(manager, Tier.G4, Tier.G2)
    start = time.perf_counter()
    hit = manager.lookup(tokens)
    seconds = time.perf_counter() - start
    if hit.from_tier.get(source, 0) != expected:
        raise RuntimeError(f"the lookup was served by {hit.from_tier}, not {expected} x {source}")
    return hit, seconds, _copy_seconds(manager, Tier.G4, Tier.G2) - read_before


def _timed_offload(here: BlockManager, there: BlockManager, tokens: list[int], size: int):
    """Seconds of the G2 -> G4 write when ``here`` stores ``tokens`` anew; checks that the
    peer holds every block afterwards."""
    here.clear()
    before = _copy_seconds(here, Tier.G2, Tier.G4)
    store_random(here, tokens, size)
    seconds = _copy_seconds(here, Tier.G2, Tier.G4) - before
    hashes = sequence_hashes(tokens, size)
    if any(there.pool(Tier.G2).lookup(h) is None for h in hashes):
        raise RuntimeError("the offload to the peer left blocks out")
    return seconds


def run(dims_for, tokens_per_block, num_blocks, warmup: int = 2, iters: int = 20):
    """One row per (tokens per block, blocks in the prefix)."""
    load_api()
    device = torch.cuda.current_device() if torch.cuda.is_available() else 0
    rows = []
    total, step = len(tokens_per_block) * len(num_blocks), 0
    for nt in tokens_per_block:
        dims: KvDims = dims_for(nt)
        config = manager_config(dims, max(num_blocks))
        with (
            nixl_transfer("there", device) as there_transfer,
            nixl_transfer("here", device) as here_transfer,
            BlockManager(config, transfer=there_transfer) as there,
            BlockManager(config, transfer=here_transfer) as here,
        ):
            endpoint = there.serve("tcp://127.0.0.1:*", stores=True)
            here.add_peer(endpoint, timeout=10.0, offload=True)  # here registers only to write
            g2 = there_transfer.register_layout(there.layout(Tier.G2))
            for nb in num_blocks:
                step += 1
                progress(step, total, f"sharing tpb={nt} N={nb}")
                tokens = random.Random(nb * 1000 + nt).choices(range(32_000), k=nb * nt)
                there.clear()
                stored = store_random(there, tokens, nt)
                peer, reads, local = [], [], []
                for i in range(warmup + iters):
                    here.clear()  # nothing cached here: the peer serves the prefix
                    hit, seconds, read_seconds = _timed_lookup(here, tokens, Tier.G4, nb)
                    here.free(hit.block_ids)
                    here.free(here.allocate(config.device_blocks))  # evicts G1; G2 keeps them
                    hit, local_seconds, _ = _timed_lookup(here, tokens, Tier.G2, nb)
                    if i == warmup + iters - 1:
                        mine = block_checksums(here.layout(Tier.G1), hit.block_ids)
                        if mine != block_checksums(there.layout(Tier.G1), stored):
                            raise RuntimeError("the lookup brought wrong bytes")
                    here.free(hit.block_ids)
                    if i >= warmup:
                        peer.append(seconds)
                        reads.append(read_seconds)
                        local.append(local_seconds)
                nbytes = nb * dims.block_bytes
                alone = nixl_alone_gbps(
                    here_transfer, there_transfer, g2, NixlOp.READ, False, nbytes, warmup, iters
                )
                rng = random.Random(nb)
                writes = [
                    _timed_offload(here, there, rng.choices(range(32_000), k=nb * nt), nt)
                    for _ in range(warmup + iters)
                ][warmup:]
                alone_write = nixl_alone_gbps(
                    here_transfer, there_transfer, g2, NixlOp.WRITE, False, nbytes, warmup, iters
                )
                peer_ms = statistics.median(peer) * 1e3
                local_ms = statistics.median(local) * 1e3
                alone_ms = nbytes / alone / 1e6
                sharing, parts = nbytes / peer_ms / 1e6, nbytes / (local_ms + alone_ms) / 1e6
                rows.append(
                    SharingRow(
                        nt,
                        nb,
                        nbytes,
                        round(peer_ms, 3),
                        round(statistics.median(reads) * 1e3, 3),
                        round(local_ms, 3),
                        round(alone_ms, 3),
                        round(statistics.median(writes) * 1e3, 3),
                        round(nbytes / alone_write / 1e6, 3),
                        round(sharing, 2),
                        round(parts, 2),
                        round(sharing / parts, 3),
                    )
                )
    return rows
