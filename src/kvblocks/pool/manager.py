"""BlockManager: the KV cache of one worker over tiers G1 (device), G2 (pinned host), G3 (disk),
and G4: what other workers' G2 caches.

An engine talks to it in four calls::

    hit = manager.lookup(prompt)                     # cached prefix, onboarded into G1, held
    new = manager.allocate(blocks_needed - len(hit.block_ids))
    ...                                              # the engine computes KV into G1 blocks
    manager.register(full_blocks, their_tokens, parent_hash=hit.last_hash)
    manager.free(hit.block_ids + new)                # the request ends; cached blocks stay

With offload enabled, every block registered in G1 is copied to G2 by a background thread, and
every block stored in G2 is copied on to G3, so a tier that evicts (least recently used first)
loses nothing a lower tier holds. :meth:`BlockManager.lookup` finds the longest prefix across
the tiers and copies the G2 and G3 part back into G1 (G3 blocks through G2, their checksums
checked on the way: a corrupted block is dropped and counts as a miss). With peers
(:meth:`BlockManager.add_peer`; :meth:`BlockManager.serve` on their side), the blocks after the
local prefix are read from the peer that caches the most of them into G2 (one NIXL READ) and
onboarded from there; a peer added with ``offload=True`` also receives every block stored in
G2 (one NIXL WRITE, beside the write to G3). :mod:`kvblocks.pool.sharing` is the conversation.

Blocks are held (reference counted in their :class:`BlockPool`) while a transfer reads or
writes them, so no transfer ever races an eviction. All bookkeeping runs under one lock; the
copies themselves run outside it. The engine's calls may come from several threads at once
(:meth:`BlockManager.close` last).

This module holds the engine's calls and the set-up; its parts live beside it:
:mod:`~kvblocks.pool.tier_set` (the tiers, their lock, the chains of cached hashes and the
events waiting to be published), :mod:`~kvblocks.pool.onboarder` (copies into G1 on a hit),
:mod:`~kvblocks.pool.inflight` (those that may still run), :mod:`~kvblocks.pool.prefetch`
(reads into G2 ahead of a lookup, on a thread of their own), :mod:`~kvblocks.pool.offloader`
(the offload thread) and :mod:`~kvblocks.pool.g4` (reads from peers, G2 served to them).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from kvblocks.checks import index_in_range, non_negative_int
from kvblocks.errors import (
    BackendUnavailableError,
    InvalidArgumentError,
    TransferError,
)
from kvblocks.pool.block_pool import BlockPool, BlockState, BlockStateError
from kvblocks.pool.config import GPU_NODE, BlockManagerConfig, DeviceLayout
from kvblocks.pool.device_tensors import checked_device_tensors
from kvblocks.pool.events import AllBlocksCleared, EventBatch, EventPublisher
from kvblocks.pool.g4 import PeerReads, ServedG2, g2_changes
from kvblocks.pool.hashing import sequence_hashes
from kvblocks.pool.inflight import InFlightCopies
from kvblocks.pool.journal import Journal
from kvblocks.pool.metrics import PoolMetrics, TierOccupancy
from kvblocks.pool.offload_filter import OffloadFilter
from kvblocks.pool.offloader import Offloader
from kvblocks.pool.onboarder import Onboarder
from kvblocks.pool.peer_set import PeerSet
from kvblocks.pool.prefetch import Prefetch, Prefetcher, PrefetchRequest
from kvblocks.pool.ready import ReadyLayers, layer_groups
from kvblocks.pool.sharing import BlockServer, BlockShape
from kvblocks.pool.tier import Tier
from kvblocks.pool.tier_set import ChainInfo, TierSet, TierState
from kvblocks.pool.window import blocks_needed, window_hit
from kvblocks.storage import PhysicalLayout
from kvblocks.storage.numa import check_node, gpu_node, nodes_of
from kvblocks.transfer import (
    LogicalLayoutHandle,
    TransferManager,
)

log = logging.getLogger("kvblocks.pool")

#: The tiers a lookup copies into G1 from unless told otherwise: every one below G1.
_LOWER_TIERS = frozenset({Tier.G2, Tier.G3, Tier.G4})

_WRITABLE = (BlockState.EMPTY, BlockState.PARTIAL, BlockState.COMPLETE)


@dataclass(frozen=True)
class PrefixHit:
    """The cached prefix :meth:`BlockManager.lookup` found, in G1 and held for the caller.

    Attributes:
        block_ids: G1 blocks holding the prefix, in order, after the ``skipped`` ones; free
            them when the request ends.
        hashes: their sequence hashes (``hashes[-1]`` is the parent of the next block).
        block_size: tokens per block.
        from_tier: how many of the held blocks were found in each tier.
        misses: full blocks of the lookup after the prefix.
        skipped: leading blocks of the prefix that a manager of sliding-window layers
            (``config.sliding_window``) does not hold, since no token after the prefix attends
            to them: the engine's block table takes its null block there. 0 for full attention.
        ready: when each layer of the held blocks holds its KV. After ``lookup(...,
            wait=False)`` copies into G1 may still run: before reading layer ``l`` of the
            blocks, the engine calls ``ready.wait_layer(l)`` (its CUDA stream waits, the host
            does not). After a lookup that waited, everything is in place already.
    """

    block_ids: list[int]
    hashes: list[int]
    block_size: int
    from_tier: dict[Tier, int] = field(default_factory=dict)
    misses: int = 0
    skipped: int = 0
    ready: ReadyLayers = field(default_factory=ReadyLayers)

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV the caller need not compute."""
        return (self.skipped + len(self.block_ids)) * self.block_size

    @property
    def last_hash(self) -> int | None:
        """The hash to pass as ``parent_hash`` when registering the blocks after the prefix."""
        return self.hashes[-1] if self.hashes else None


class BlockManager:
    """The tiers, pools, offload thread, events and metrics of one worker.

    Args:
        config: sizes of blocks and tiers.
        publisher: where KV events go (none by default).
        device_tensors: the engine's own G1 cache, contiguous tensors shaped as
            ``config.device_layout`` says: one per layer ``[num_blocks, no, *inner]``
            (``BLOCK_FIRST``) or ``[no, num_blocks, *inner]`` (``OUTER_FIRST``), one per layer
            and outer chunk ``[num_blocks, *inner]`` (``OUTER_SEPARATE``), or one
            ``[num_blocks, nl, no, *inner]`` (``FULLY_CONTIGUOUS``), ``inner`` being ``[nt, nh,
            hd]`` (``device_format`` NHD) or ``[nh, nt, hd]`` (HND). Dims of size 1 may be left
            out (vLLM's MLA cache, ``[num_blocks, nt, hd]`` per layer, is ``BLOCK_FIRST`` with
            ``no = nh = 1``). By default the manager allocates them (see
            :attr:`device_tensors`, and :meth:`region_view` for one layer's K or V of every
            block whatever the layout).
        transfer: a TransferManager to move blocks with (one is built by default).
        disk_filter: which blocks stored in G2 are also written to G3
            (:mod:`~kvblocks.pool.offload_filter`); every one by default.

    Attributes:
        config: the config it was built with.
        device_tensors: the tensors G1 lives in, in ``config.device_layout``'s shapes: those
            passed (viewed in those shapes where dims of size 1 were left out), or allocated.
        metrics: its counters (:class:`~kvblocks.pool.metrics.PoolMetrics`).

    Raises:
        InvalidArgumentError: a bad config or tensors that do not match it.
        StorageError: a tier cannot be allocated.
    """

    def __init__(
        self,
        config: BlockManagerConfig,
        *,
        publisher: EventPublisher | None = None,
        device_tensors: Sequence[torch.Tensor] | None = None,
        transfer: TransferManager | None = None,
        disk_filter: OffloadFilter | None = None,
    ) -> None:
        if not isinstance(config, BlockManagerConfig):
            raise InvalidArgumentError("config", f"must be a BlockManagerConfig, got {config!r}")
        if disk_filter is not None and not all(
            callable(getattr(disk_filter, name, None)) for name in ("use", "passes")
        ):
            raise InvalidArgumentError(
                "disk_filter", f"must have use() and passes() (OffloadFilter), got {disk_filter!r}"
            )
        self._disk_filter = disk_filter
        self.config = config
        self._window_blocks = (
            None
            if config.sliding_window is None
            else blocks_needed(config.sliding_window, config.block_size)
        )
        self.block_bytes = config.block_bytes
        self._publish_lock = threading.Lock()
        self._publisher = publisher
        self.metrics = PoolMetrics(self.occupancy)
        self._server: BlockServer | None = None
        self._owns_transfer = transfer is None
        self._transfer = transfer or self._build_transfer(config)
        self._tiers = TierSet(self._transfer, self.metrics, config.block_size, self.block_bytes)
        self._lock = self._tiers.lock
        self._peers = PeerSet(BlockShape.of(config), self._transfer, self.metrics)
        self._peer_reads = PeerReads(self._tiers, self._peers)
        try:
            self.device_tensors = self._device_tensors(device_tensors)
            self._tiers.add(Tier.G1, self._g1_layout())
            if config.enable_offload:
                self._tiers.add(Tier.G2, self._g2_layout())
                if config.disk_blocks:
                    self._open_disk_tier()
                self._warm_up()
        except BaseException:
            self._release_tiers()
            raise
        device = self.device_tensors[0].device
        self._inflight = InFlightCopies(self._tiers, config.num_layers, device)
        self._onboarder = Onboarder(self._tiers, self._inflight, self._transfer, device)
        self._onboard_groups = layer_groups(config.num_layers, config.onboard_layer_groups)
        self._offloader = self._prefetcher = None
        if config.enable_offload:
            self._prefetcher = Prefetcher(
                self._tiers,
                self._onboarder,
                self._peer_reads,
                self.metrics,
                self._publish,
                self._window_blocks,
            )
            self._offloader = Offloader(
                self._tiers, self._inflight, self._peers, disk_filter, self._publish, device
            )
        self._publish()

    # Set-up ------------------------------------------------------------------------------------

    @staticmethod
    def _build_transfer(config: BlockManagerConfig) -> TransferManager:
        builder = TransferManager.builder().cuda_device_id(config.device_id)
        if config.nixl_backend is not None:  # agents of one process need distinct names
            builder.agent_name(f"kvblocks-{secrets.token_hex(6)}").nixl_backend(config.nixl_backend)
        return builder.build()

    def _warm_up(self) -> None:
        """On a GPU, move G1's block 0 to G2 and back once, so that the kernels of both
        directions are compiled and loaded (about 0.7 s on a first run) before the first
        offload or onboard needs them. Every block is free here, and the round trip leaves
        block 0's bytes as they were."""
        if self.device_tensors[0].device.type != "cuda":
            return
        g1, g2 = self._tiers[Tier.G1].handle, self._tiers[Tier.G2].handle
        self._transfer.execute_transfer(g1, [0], g2, [0]).wait()
        self._transfer.execute_transfer(g2, [0], g1, [0]).wait()

    def _device_tensors(self, tensors: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
        config = self.config
        if tensors is None:
            num_blocks = config.device_blocks or self._blocks_from_gpu_memory()
            device = (
                torch.device("cuda", config.device_id)
                if torch.cuda.is_available()
                else torch.device("cpu")
            )
            return [
                torch.zeros(shape, dtype=config.dtype, device=device)
                for shape in config.device_tensor_shapes(num_blocks)
            ]
        return checked_device_tensors(config, tensors)

    def _blocks_from_gpu_memory(self) -> int:
        if not torch.cuda.is_available():
            raise InvalidArgumentError("device_blocks", "must be given on a machine without a GPU")
        free, _ = torch.cuda.mem_get_info(self.config.device_id)
        blocks = int(free * self.config.gpu_memory_fraction) // self.block_bytes
        if blocks < 1:
            raise InvalidArgumentError(
                "gpu_memory_fraction",
                f"leaves no room for one block of {self.block_bytes} bytes ({free} bytes free)",
            )
        return blocks

    def _g1_layout(self) -> PhysicalLayout:
        config = self.config
        layout = config.device_layout
        num_blocks = self.device_tensors[0].shape[layout.block_axis]
        return (
            PhysicalLayout.builder(config.layout_config(num_blocks))
            .of_kind(layout.layout_kind, layout.block_dim)
            .kv_format(config.device_format)
            .with_external_regions(self.device_tensors)
            .build()
        )

    def _g2_layout(self) -> PhysicalLayout:
        """G2: pinned host memory, on the NUMA node ``config.host_numa_node`` names."""
        config = self.config
        node = config.host_numa_node
        if node == GPU_NODE:
            node = gpu_node(config.device_id) if self.device_tensors[0].is_cuda else None
        elif node is not None:
            check_node(node, "host_numa_node")
        physical = self._storage_builder(config.host_blocks).allocate_pinned(node).build()
        if node is not None:
            _log_placement(physical, node)
        return physical

    def _storage_builder(self, num_blocks: int):
        return (
            PhysicalLayout.builder(self.config.layout_config(num_blocks))
            .fully_contiguous()
            .kv_format(self.config.storage_format)
        )

    def _open_disk_tier(self) -> None:
        config = self.config
        slots = config.disk_blocks
        fingerprint = {
            "layout": [
                config.num_layers,
                config.outer_dim,
                config.block_size,
                config.num_kv_heads,
                config.head_dim,
                str(config.dtype),
            ],
            "format": config.storage_format.name,
            "slots": slots,
        }
        if config.disk_cache_key is not None:
            fingerprint["key"] = config.disk_cache_key
        name = os.path.join(config.offload_path, f"kvblocks-g3-{self._g3_name(fingerprint)}")
        journal = self._tiers.journal = Journal(name + ".journal", fingerprint, slots)
        stored = list(journal.blocks.values())
        layout = (
            self._storage_builder(slots)
            .allocate_disk(name + ".bin", keep=True, reuse=bool(stored))
            .build()
        )
        pool = self._tiers.add(Tier.G3, layout).pool
        if stored:  # blocks an earlier process stored: cached and inactive, oldest first
            ids = pool.allocate(slots)
            restored = [b.slot for b in stored]
            for block in stored:
                pool.fill(block.slot, config.block_size)
                pool.register(block.slot, block.seq_hash)
                self._tiers.chains[block.seq_hash] = ChainInfo(block.parent, block.token_ids)
            unused = set(ids) - set(restored)
            pool.free([b for b in ids if b in unused] + restored)
            self._tiers.emit_stored(Tier.G3, [b.seq_hash for b in stored])

    @staticmethod
    def _g3_name(fingerprint: dict) -> str:
        """``<key>-<shape>-<slots>``: the key in file-name characters (cut to 48) and the first
        8 hex digits of its SHA-256 (so keys that read alike stay apart), or no key part."""
        layout = fingerprint["layout"]
        shape = "x".join(str(v) for v in layout[:5]) + f"-{fingerprint['slots']}"
        key = fingerprint.get("key")
        if key is None:
            return shape
        digest = hashlib.sha256(key.encode()).hexdigest()[:8]
        return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', key)[:48]}-{digest}-{shape}"

    # Queries -----------------------------------------------------------------------------------

    @property
    def tiers(self) -> list[Tier]:
        """The tiers this manager has, fastest first."""
        return list(self._tiers)

    def pool(self, tier: Tier) -> BlockPool:
        """The block pool of ``tier`` (read it; change blocks only through the manager)."""
        return self._tier(tier).pool

    def layout(self, tier: Tier) -> PhysicalLayout:
        """The physical layout of ``tier``'s memory."""
        return self._tier(tier).physical

    def region_view(self, layer: int, outer: int) -> torch.Tensor:
        """Region ``(layer, outer)`` (layer ``layer``'s K for ``outer=0``, V for 1) of every G1
        block, ``[num_blocks, *inner]``, whatever the config's ``device_layout``: a view of
        :attr:`device_tensors` (no copy; writes go to the cache).

        Raises:
            InvalidArgumentError: ``layer`` or ``outer`` is out of range.
        """
        index_in_range(layer, self.config.num_layers, "layer")
        index_in_range(outer, self.config.outer_dim, "outer")
        layout, tensors = self.config.device_layout, self.device_tensors
        if layout is DeviceLayout.FULLY_CONTIGUOUS:
            return tensors[0][:, layer, outer]
        if layout is DeviceLayout.OUTER_SEPARATE:
            return tensors[layer * self.config.outer_dim + outer]
        if layout is DeviceLayout.OUTER_FIRST:
            return tensors[layer][outer]
        return tensors[layer][:, outer]

    def occupancy(self) -> dict[Tier, TierOccupancy]:
        """Blocks per tier: held, free or evictable, cached, total."""
        with self._lock:
            return {
                t: TierOccupancy(
                    s.pool.num_in_use, s.pool.num_available, s.pool.num_cached, s.pool.num_blocks
                )
                for t, s in self._tiers.items()
            }

    def _tier(self, tier: Tier) -> TierState:
        state = self._tiers.get(tier)
        if state is None:
            raise InvalidArgumentError("tier", f"{tier} is not configured; have {self.tiers}")
        return state

    # The engine's calls ------------------------------------------------------------------------

    def lookup(
        self,
        token_ids: Sequence[int],
        *,
        salt: int = 0,
        ask_peer: str | None = None,
        max_blocks: int | None = None,
        wait: bool = True,
        onboard_from: Collection[Tier] | None = None,
    ) -> PrefixHit:
        """The longest prefix of ``token_ids`` (in full blocks) cached in any tier, in G1.

        G1 hits are shared; G2 and G3 hits are copied into newly allocated G1 blocks (as many
        as G1 can make room for), G3 blocks through G2 with their checksums checked. Where the
        local tiers' prefix ends, the peers (:meth:`add_peer`) are asked for the blocks that
        follow, which are read into G2 (and stay cached there; on a thread of the manager's,
        at the same time as the local part's G3 blocks) and copied on into G1. The returned
        blocks are held for the caller; with ``wait`` their bytes are in place on return.

        With ``wait=False`` the copies from G2 into G1 are only issued: on a stream of the
        manager's (after the work queued so far on the current stream), in
        ``config.onboard_layer_groups`` groups of layers, first layers first. The engine then
        makes its stream wait for each layer before reading it (``hit.ready.wait_layer(l)``),
        so its forward pass overlaps the copies of later layers and the host does not wait.
        (Reads from G3 and from peers into G2 are waited for either way.) Freeing the blocks
        before the copies end is safe: the manager holds them, and their G2 sources, until
        then.

        With ``config.sliding_window`` the prefix ends after the last run of blocks holding a
        window's tokens that the tiers (and peers) cache, and only that run is held and copied
        (:mod:`~kvblocks.pool.window`; the blocks before it are ``PrefixHit.skipped``).

        Args:
            ask_peer: the endpoint of a peer to ask whatever its news says, because it stored
                the prompt a moment ago (the worker that ran its prefill, say), so that a
                hand-off does not miss while the news is on the way.
            max_blocks: look at the first ``max_blocks`` full blocks only (the hit that the
                manager of another group of the model's layers found, say); None: all.
            wait: return once the held blocks' bytes are in place; False: as soon as the
                copies are issued (see above and :class:`~kvblocks.pool.ready.ReadyLayers`).
            onboard_from: the tiers whose blocks may be copied into G1, among G2, G3 and G4
                (the peers); None: all of them. G1's blocks are always shared. The prefix
                ends at the first block that neither G1 nor these tiers cache (the blocks
                after it count in ``misses``), and peers are asked for the blocks after what
                G1 and the local tiers named cache. ``{Tier.G2, Tier.G4}`` never waits for
                the disk, say: for an engine that computes a prefix faster than its disk
                reads it (see :meth:`locate` and ``metrics.onboard_rate``).

        Raises:
            InvalidArgumentError: ``ask_peer`` is not a peer (or ``onboard_from`` leaves the
                peers out), ``max_blocks`` is not an int >= 0, or ``onboard_from`` names
                something other than G2, G3 and G4.
            TransferError: a copy into G1 failed (with ``wait``; otherwise the waits of
                ``hit.ready`` raise it). The blocks are not held then.
        """
        self._check_peer(ask_peer)
        if not isinstance(wait, bool):
            raise InvalidArgumentError("wait", f"must be a bool, got {wait!r}")
        sources = _onboard_sources(onboard_from)
        if ask_peer is not None and Tier.G4 not in sources:
            raise InvalidArgumentError(
                "ask_peer", f"names {ask_peer!r} to ask, but onboard_from leaves out G4 (peers)"
            )
        token_ids, hashes = self._prompt(token_ids, salt, max_blocks)
        size = self.config.block_size
        self._inflight.reap()
        groups = (range(self.config.num_layers),) if wait else self._onboard_groups
        if self._window_blocks is not None:
            return self._lookup_window(hashes, token_ids, ask_peer, groups, wait, sources)
        g1 = self._tiers[Tier.G1].pool
        with self._lock:
            held = g1.match_sequence_hashes(hashes)
            g1.acquire(held)
            short = g1.num_available < len(hashes) - len(held)
        if short:  # blocks waiting to be offloaded or onboarded come back once those end
            self._drain()
            self._inflight.settle()
        try:
            from_tier = self._onboard_after(held, hashes, token_ids, ask_peer, groups, sources)
            ready = self._inflight.ready(held, wait)
        except BaseException:  # the caller gets no blocks to free: let the G1 hits go
            with self._lock:
                g1.free(held)
            raise
        misses = len(hashes) - len(held)
        self._note_uses(hashes[: len(held)])
        self.metrics.record_lookup(from_tier, misses)
        self._publish()
        return PrefixHit(held, hashes[: len(held)], size, from_tier, misses, ready=ready)

    def prefetch(
        self,
        token_ids: Sequence[int],
        *,
        salt: int = 0,
        ask_peer: str | None = None,
        max_blocks: int | None = None,
        first_block: int = 0,
    ) -> Prefetch:
        """Start bringing into G2 the blocks of ``token_ids``'s cached prefix that only G3 or
        a peer holds, on a background thread of the manager's, and return at once.

        A lookup waits for the disk's and the peers' reads of its prefix (0.8 s for 16k tokens
        of a 70B model at 1.7 GB/s, say), and the engine's scheduler with it. With a prefetch
        the scheduler goes on with its other requests meanwhile, and when
        :meth:`Prefetch.done` says so, looks the prompt up with ``onboard_from={Tier.G2}``:
        the whole prefix is then copied from G2 (or shared in G1), and nothing waits for a
        disk. The prefetch holds the prefix's G2 blocks until :meth:`Prefetch.release`
        (use it as a context manager); G1's blocks are not held. Prefetches are carried out
        one after the other, each as the lookup would read: G3 blocks in chunks, checked
        against their checksums; at the same time, on a second thread, the peers
        (:meth:`add_peer`) are asked for the blocks after the local tiers' part. Together
        they hold at most half of G2's blocks
        (:data:`~kvblocks.pool.prefetch.PREFETCH_SHARE`); a longer prefix is brought in part.
        With ``config.sliding_window``, only the last window's run of blocks is brought in.

        Args:
            ask_peer: as for :meth:`lookup`.
            max_blocks: look at the first ``max_blocks`` full blocks only; None: all.
            first_block: leave the prefix's blocks before this one alone (neither read nor
                held nor counted): the engine computes them meanwhile, as
                :func:`~kvblocks.pool.read_split` advises, or has them already.

        Raises:
            InvalidArgumentError: the manager is closed, no G2 (offload is off), ``ask_peer``
                is not a peer, or ``max_blocks`` or ``first_block`` is not an int >= 0. (The
                reads' errors come from :meth:`Prefetch.wait`.)
        """
        if not self._tiers:
            raise InvalidArgumentError("manager", "is closed")
        if self._prefetcher is None:
            raise InvalidArgumentError(
                "config.enable_offload", "prefetch reads into G2: enable offload with a host cache"
            )
        self._check_peer(ask_peer)
        first_block = non_negative_int(first_block, "first_block")
        token_ids, hashes = self._prompt(token_ids, salt, max_blocks)
        request = PrefetchRequest(hashes, token_ids, first_block, ask_peer, bool(self._peers))
        return self._prefetcher.submit(request)

    def _check_peer(self, ask_peer: str | None) -> None:
        if ask_peer is not None and self._peers.get(ask_peer) is None:
            raise InvalidArgumentError("ask_peer", f"{ask_peer!r} is not a peer; have {self.peers}")

    def _prompt(
        self, token_ids: Sequence[int], salt: int, max_blocks: int | None
    ) -> tuple[Sequence[int], list[int]]:
        """``token_ids`` cut to their first ``max_blocks`` full blocks (None: all), and the
        sequence hashes of their full blocks."""
        size = self.config.block_size
        if max_blocks is not None:
            token_ids = token_ids[: non_negative_int(max_blocks, "max_blocks") * size]
        return token_ids, sequence_hashes(token_ids, size, salt=salt)

    def locate(self, token_ids: Sequence[int], *, salt: int = 0) -> list[Tier | None]:
        """Where each full block of ``token_ids`` is cached now: the fastest local tier that
        holds it (G1, then G2, then G3), None where none does. Holds and copies nothing, so
        the answer lasts until the next eviction; peers are not asked (their news:
        :meth:`peer_prefixes`).

        An engine weighs what a lookup would copy against computing those tokens again: a
        block from tier ``t`` costs about ``block_bytes / metrics.onboard_rate(t, ...)``
        seconds (G3 blocks go through G2), and ``lookup(..., onboard_from=...)`` leaves out
        the tiers that do not pay.
        """
        hashes = sequence_hashes(token_ids, self.config.block_size, salt=salt)
        with self._lock:
            return [self._tiers.tier_of(h) for h in hashes]

    def _onboard_after(
        self,
        held: list[int],
        hashes: list[int],
        token_ids: Sequence[int],
        ask_peer: str | None,
        groups: tuple[range, ...],
        sources: frozenset[Tier],
    ) -> dict[Tier, int]:
        """Extend the held G1 prefix ``held`` (in place) with the blocks after it that the
        tiers of ``sources`` cache (G2, G3, or a peer: G4); returns how many blocks came from
        each tier. Where the local part has G3 blocks, a peer's blocks after it are read at
        the same time as those, and copied into G1 after them."""
        from_tier = {Tier.G1: len(held)}
        if not (self._peers and Tier.G4 in sources):
            held += self._onboarder.onboard(hashes[len(held) :], {}, from_tier, groups, sources)
            return from_tier
        fetch = self._peer_reads.start(hashes, token_ids, len(held), ask_peer, sources)
        try:
            if not fetch.future.done():  # the peer's blocks are read while the disk's are
                local = hashes[len(held) : fetch.local_end]
                held += self._onboarder.onboard(local, {}, from_tier, groups, sources)
        except BaseException:
            self._free_fetched(fetch.result_quietly())
            raise
        fetched = fetch.future.result()
        try:
            held += self._onboarder.onboard(
                hashes[len(held) :], fetched, from_tier, groups, sources
            )
            return from_tier
        finally:
            self._free_fetched(fetched)

    def _free_fetched(self, fetched: dict[int, int]) -> None:
        """Let go of the G2 blocks a peer read held for a lookup (they stay cached)."""
        if fetched:
            with self._lock:
                self._tiers[Tier.G2].pool.free(list(fetched.values()))

    def _lookup_window(
        self,
        hashes: list[int],
        token_ids: Sequence[int],
        ask_peer: str | None,
        groups: tuple[range, ...],
        wait: bool,
        sources: frozenset[Tier],
    ) -> PrefixHit:
        """:meth:`lookup` for sliding-window layers: hold the last run of ``_window_blocks``
        blocks that G1 and ``sources`` cache (peers asked for the blocks after the local
        tiers' run) and skip the blocks before it."""
        needed = self._window_blocks
        fetched = {}
        if self._peers and Tier.G4 in sources:
            local_end = self._window_end(hashes, set(), sources)
            fetched = self._peer_reads.fetch(hashes, token_ids, local_end, ask_peer, sources)
        try:
            gone: set[int] = set()
            while True:
                end = self._window_end(hashes, gone, sources)
                start = max(end - needed, 0)
                held, from_tier = self._hold(hashes[start:end], fetched, groups, sources)
                if len(held) == end - start:
                    break
                with self._lock:  # a block went meanwhile (evicted, corrupt, or no room in G1)
                    self._tiers[Tier.G1].pool.free(held)
                gone.add(start + len(held))
        finally:
            self._free_fetched(fetched)
        try:
            ready = self._inflight.ready(held, wait)
        except BaseException:
            with self._lock:
                self._tiers[Tier.G1].pool.free(held)
            raise
        misses = len(hashes) - end
        self._note_uses(hashes[start:end])
        self.metrics.record_lookup(from_tier, misses, skipped=start)
        self._publish()
        size = self.config.block_size
        return PrefixHit(
            held, hashes[start:end], size, from_tier, misses, skipped=start, ready=ready
        )

    def _window_end(self, hashes: list[int], gone: set[int], sources: frozenset[Tier]) -> int:
        """The end of the sliding-window hit over what G1 and the local tiers of ``sources``
        cache now, the blocks at positions ``gone`` taken for missing."""
        with self._lock:
            pools = [s.pool for t, s in self._tiers.items() if t is Tier.G1 or t in sources]
            return window_hit(
                len(hashes),
                self._window_blocks,
                lambda i: i not in gone and any(p.lookup(hashes[i]) is not None for p in pools),
            )

    def _hold(
        self,
        hashes: list[int],
        fetched: Mapping[int, int],
        groups: tuple[range, ...],
        sources: frozenset[Tier],
    ) -> tuple[list[int], dict[Tier, int]]:
        """Hold in G1 the longest prefix of ``hashes`` that G1 and ``sources`` cache: G1's
        blocks shared, the others onboarded (``fetched``: hashes a peer's read brought into
        G2). Returns the held blocks and how many came from each tier."""
        g1 = self._tiers[Tier.G1].pool
        held: list[int] = []
        from_tier = {Tier.G1: 0}
        try:
            while len(held) < len(hashes):
                with self._lock:
                    shared = g1.match_sequence_hashes(hashes[len(held) :])
                    g1.acquire(shared)
                    short = g1.num_available < len(hashes) - len(held) - len(shared)
                held += shared
                from_tier[Tier.G1] += len(shared)
                if len(held) == len(hashes):
                    break
                if short:  # blocks waiting to be offloaded or onboarded come back once those end
                    self._drain()
                    self._inflight.settle()
                onboarded = self._onboarder.onboard(
                    hashes[len(held) :], fetched, from_tier, groups, sources
                )
                held += onboarded
                if not shared and not onboarded:
                    break
        except BaseException:
            with self._lock:
                g1.free(held)
            raise
        return held, from_tier

    def allocate(self, n: int) -> list[int]:
        """``n`` empty G1 blocks held for the caller (inactive cached blocks are evicted, least
        recently used first, to make room).

        Raises:
            PoolExhaustedError: fewer than ``n`` blocks are free or evictable.
        """
        start = time.perf_counter()
        self._inflight.reap()
        g1 = self._tiers[Tier.G1].pool
        with self._lock:
            short = n > g1.num_available
            if not short:
                ids = g1.allocate(n)
        if short:  # blocks waiting to be offloaded or onboarded come back once those end
            self._drain()
            self._inflight.settle()
            with self._lock:
                ids = g1.allocate(n)
        self.metrics.record_allocation(time.perf_counter() - start)
        self._publish()
        return ids

    def register(
        self,
        block_ids: Sequence[int],
        token_ids: Sequence[int],
        *,
        parent_hash: int | None = None,
        salt: int = 0,
    ) -> list[int]:
        """Record that G1 ``block_ids`` now hold the KV of ``token_ids`` (``block_size`` tokens
        each, in order) and make them findable; returns their sequence hashes.

        ``parent_hash`` is the hash of the block before ``block_ids[0]`` (``PrefixHit.last_hash``,
        or the last hash an earlier ``register`` of this sequence returned); None starts a
        sequence. A block whose hash another G1 block already caches stays unregistered (it is
        freed normally). With offload, the new blocks are copied to G2 in the background, after
        the work queued so far on the current CUDA stream.
        """
        size = self.config.block_size
        if len(token_ids) != len(block_ids) * size:
            raise InvalidArgumentError(
                "token_ids",
                f"must hold {size} tokens per block, {len(block_ids) * size} in all,"
                f" got {len(token_ids)}",
            )
        hashes = sequence_hashes(token_ids, size, parent=parent_hash, salt=salt)
        g1 = self._tiers[Tier.G1].pool
        with self._lock:
            for b in block_ids:
                state = g1.state(b)
                if state not in _WRITABLE or g1.refcount(b) != 1:
                    raise BlockStateError(
                        f"block {b} is {state.name} with {g1.refcount(b)} holders: only a block"
                        " allocated to the caller and not yet registered can be registered"
                    )
            if len(set(block_ids)) != len(block_ids):
                raise InvalidArgumentError("block_ids", "must not name a block twice")
            self._tiers.remember_chains(hashes, token_ids, parent_hash)
            _, new = self._tiers.cache(g1, block_ids, hashes)
            new_blocks, new_hashes = [b for b, _ in new], [h for _, h in new]
            self._tiers.emit_stored(Tier.G1, new_hashes)
            if new_blocks and self._offloader is not None:
                g1.acquire(new_blocks)
                self._offloader.offload_g1(new_blocks, new_hashes)
            self._note_uses(hashes)
        self._publish()
        return hashes

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop the caller's hold on G1 blocks; registered ones stay cached (inactive)."""
        with self._lock:
            self._tiers[Tier.G1].pool.free(block_ids)
        self._inflight.reap()
        self._publish()

    def clear(self) -> None:
        """Drop every cached block nobody holds, in every tier (waits for offloads first)."""
        self.flush()
        with self._lock:
            for state in self._tiers.values():
                state.pool.clear()
            self._tiers.emit(AllBlocksCleared())
        self._publish()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every offload queued so far, and every copy into G1 a lookup issued, has
        finished, and publish pending events.

        Raises:
            TransferError: an offload failed since the last flush (its blocks were not stored
                in the lower tier; nothing else was lost).
            TimeoutError: ``timeout`` seconds passed first.
        """
        self._drain(timeout)
        self._inflight.settle()
        self._publish()
        failures = self._offloader.take_failures() if self._offloader is not None else []
        if failures:
            raise TransferError(
                f"{len(failures)} offload batch(es) failed; the first: {failures[0]!r}"
            )

    def _drain(self, timeout: float | None = None) -> None:
        """Wait until every offload queued so far has been carried out."""
        if self._offloader is not None:
            self._offloader.drain(timeout)

    def close(self) -> None:
        """Stop serving peers, finish the offloads, publish the last events and release every
        tier (the G3 file and its journal stay for the next process).

        The last event published is ``AllBlocksCleared``: routers that follow this worker
        forget its blocks (a next process that reuses the G3 file announces those again).
        Closing again does nothing."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
        if self._offloader is not None:  # its offloads may still write to peers
            self._offloader.close()
            self._offloader = None
        if self._tiers:
            self._inflight.settle()
        self._peer_reads.close()
        self._peers.close()
        with self._lock:
            if self._tiers:
                self._tiers.emit(AllBlocksCleared())
        self._publish()
        self._release_tiers()

    def __enter__(self) -> BlockManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _release_tiers(self) -> None:
        self._tiers.release()
        if self._owns_transfer:
            self._transfer.close()
            self._owns_transfer = False

    def _note_uses(self, hashes: list[int]) -> None:
        """Count a use of each hash with the disk filter, and write to G3 the blocks that G2
        holds and that pass from this use on (they were kept off the disk until now)."""
        if self._disk_filter is None:
            return
        with self._lock:
            passed = self._disk_filter.use(hashes)
            if passed and self._offloader is not None:
                self._offloader.offload_late(passed)

    # Sharing with other workers (G4) ----------------------------------------------------------

    def serve(
        self, endpoint: str = "tcp://*:5600", stores: bool = False, news_endpoint: str | None = None
    ) -> str:
        """Serve the blocks cached in G2 to other workers' managers (their tier G4) from a
        background thread, until :meth:`close`. Returns the endpoint bound (a port of ``*``
        picks a free one). Anyone who reaches the endpoint can read the served blocks.

        With ``stores``, this worker also takes the blocks that peers offload to it
        (``add_peer(..., offload=True)`` there): they are written into G2 (evicting the least
        recently used blocks as any allocation does), cached there and announced with
        ``BlockStored``, and served to every peer like its own.

        Every change of G2 is announced at ``news_endpoint`` (by default a free port on the
        host of ``endpoint``), so that peers ask this worker only for blocks it caches.

        Raises:
            InvalidArgumentError: no G2 (offload is off), already serving, or ``endpoint`` or
                ``news_endpoint`` cannot be bound.
            BackendUnavailableError: no NIXL agent (set ``config.nixl_backend``), or no
                pyzmq / msgpack.
        """
        g2 = self._shared_g2("serve")
        if self._server is not None:
            raise InvalidArgumentError(
                "endpoint", f"this manager serves at {self._server.endpoint} already"
            )
        self._transfer.build_logical_descriptor(g2.handle, LogicalLayoutHandle.G2)
        layout = self._transfer.export_layout(g2.handle).to_bytes()
        shape = BlockShape.of(self.config)
        served = ServedG2(self._tiers, self._publish)
        self._server = BlockServer(endpoint, shape, layout, served, stores, news_endpoint)
        return self._server.endpoint

    def add_peer(
        self, endpoint: str, timeout: float = 1.0, offload: bool = False, news: bool = False
    ) -> None:
        """Ask the manager serving at ``endpoint`` (see :meth:`serve`) for the blocks of a
        prefix that no local tier caches, on lookups from now on. A peer that does not
        answer within ``timeout`` seconds, or whose blocks cannot be read or written, is left
        alone for :data:`~kvblocks.pool.peer_set.PEER_RETRY_S` seconds (a warning is logged);
        the lookup or offload goes on without it.

        By default the peer is asked on every lookup that misses locally. With ``news``, this
        manager follows the peer's announcements of what its G2 stores and evicts
        (:mod:`kvblocks.pool.peer_index`) and asks it only for a prefix it caches, and only if
        no other peer caches more of it: a lookup whose blocks no peer caches sends no
        request at all. The price: a block the peer stored a moment ago, whose news is still
        on the way, is missed (even after the peer's :meth:`flush`). Where the news cannot be
        heard (it is waited for up to ``timeout``), the peer is asked as without ``news``.

        With ``offload``, every block this worker stores in G2 is also written to the peer's
        G2 by the offload thread (the peer must serve with ``stores=True``), as it is written
        on to G3: a peer with a large host memory becomes a cache shared by its peers.

        Raises:
            PeerError: no answer within ``timeout``, or another protocol version.
            ConfigMismatchError: the peer keeps blocks of another shape (names the field).
            InvalidArgumentError: no G2 (offload is off), ``endpoint`` is a peer already, or
                ``offload`` to a peer that does not store other workers' blocks.
            BackendUnavailableError: no NIXL agent (set ``config.nixl_backend``), or no
                pyzmq / msgpack.
        """
        self._shared_g2("add_peer")
        self._peers.add(endpoint, timeout, offload, news)

    def remove_peer(self, endpoint: str) -> None:
        """Stop asking the peer at ``endpoint``."""
        self._peers.remove(endpoint)

    @property
    def news_endpoint(self) -> str | None:
        """Where this manager announces its G2's changes while it serves (:meth:`serve`)."""
        return self._server.info.news if self._server is not None else None

    @property
    def num_peer_leases(self) -> int:
        """Leases and reservations this manager holds for peers now (0 when not serving)."""
        return self._server.num_leases if self._server is not None else 0

    @property
    def peers(self) -> list[str]:
        """The endpoints of the peers, in the order they are asked."""
        return self._peers.endpoints

    def peer_prefixes(
        self, token_ids: Sequence[int], *, salt: int = 0, first_block: int = 0
    ) -> dict[str, int | None]:
        """Per peer, how many whole blocks of ``token_ids``, from block ``first_block`` on,
        its news says it caches; None where its news is unknown or not followed. Asks no
        peer.

        Raises:
            InvalidArgumentError: ``first_block`` is not an int >= 0.
        """
        first_block = non_negative_int(first_block, "first_block")
        hashes = sequence_hashes(token_ids, self.config.block_size, salt=salt)
        return self._peers.prefixes(hashes[first_block:])

    def _shared_g2(self, call: str) -> TierState:
        state = self._tiers.get(Tier.G2)
        if state is None:
            raise InvalidArgumentError(
                "config.enable_offload",
                f"{call} shares G2 blocks: enable offload with a host cache",
            )
        if self._transfer.nixl is None:
            raise BackendUnavailableError(
                f'{call} needs a NIXL agent: set config.nixl_backend ("UCX") or pass a'
                " TransferManager built with .nixl_backend(...)"
            )
        return state

    # Events ------------------------------------------------------------------------------------

    def _publish(self) -> None:
        with self._publish_lock:
            events = self._tiers.take_events()
            if events and self._publisher is not None:
                self._publisher.publish(EventBatch(time.time(), tuple(events)))
            server = self._server  # close() may drop it meanwhile
            if events and server is not None:
                server.announce(g2_changes(events))


def _onboard_sources(onboard_from: Collection[Tier] | None) -> frozenset[Tier]:
    """The tiers a lookup copies into G1 from, checked: ``onboard_from`` (None: all)."""
    if onboard_from is None:
        return _LOWER_TIERS
    if isinstance(onboard_from, (str, Tier)) or not isinstance(onboard_from, Collection):
        raise InvalidArgumentError(
            "onboard_from",
            f"must be a collection of tiers among G2, G3 and G4, or None; got {onboard_from!r}",
        )
    bad = [t for t in onboard_from if not isinstance(t, Tier) or t not in _LOWER_TIERS]
    if bad:
        raise InvalidArgumentError(
            "onboard_from",
            f"names tiers among G2, G3 and G4 (G1's blocks are always shared); got {bad[0]!r}",
        )
    return frozenset(onboard_from)


def _log_placement(g2: PhysicalLayout, node: int) -> None:
    """Say where G2's pages went: a warning where most of those touched so far (all of them
    on a GPU, where pinning touches every page) are off ``node`` (its memory was full)."""
    where = nodes_of(g2.allocations[0].view())
    touched = sum(where.values())
    if touched and where[node] < touched / 2:
        others = ", ".join(f"node {n}: {count}" for n, count in sorted(where.items()))
        log.warning(
            "G2 was to be on NUMA node %d, but only %d of %d pages sampled are there (%s):"
            " was its memory full?",
            node,
            where[node],
            touched,
            others,
        )
    else:
        log.info("G2: %d bytes of pinned memory on NUMA node %d", g2.allocations[0].size, node)
