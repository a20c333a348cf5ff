"""TransferManager: registers layouts and moves blocks between any two of them.

::

    manager = TransferManager.builder().cuda_device_id(0).build()
    gpu = manager.register_layout(gpu_layout)
    host = manager.register_layout(host_layout)
    notification = manager.execute_transfer(gpu, [0, 1, 2], host, [7, 8, 9])
    notification.wait()            # or: await notification

Every argument is checked before any work starts; a bad call raises and moves nothing. A
transfer that stays on the GPU is enqueued on a stream of the pool, ordered after the work
already queued on the caller's current stream, and completes through a CUDA event. A transfer
with CPU, disk or NIXL steps runs on a worker thread and completes through a future; if it
fails, its notification carries the error and only blocks it names were touched.

Built with ``.nixl_backend("UCX")``, the manager has a NIXL agent named after ``agent_name``:
it registers every memory layout with it, ``export_layout`` carries the agent's metadata, and
a transfer between a local layout and one from ``import_layout`` is a NIXL READ or WRITE.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch

from kvblocks.checks import non_negative_int, positive_int
from kvblocks.errors import BackendUnavailableError, InvalidArgumentError
from kvblocks.kernels.cuda_calls import wait_for
from kvblocks.kernels.memcpy import has_cuda_bindings
from kvblocks.remote import NixlAgent
from kvblocks.storage import PhysicalLayout, StorageKind
from kvblocks.transfer.arguments import (
    bounce_side,
    checked_options,
    kv_format,
    layer_group,
    share_memory,
    transfer_sides,
)
from kvblocks.transfer.executor import Side
from kvblocks.transfer.handles import (
    LayoutHandle,
    LogicalLayoutDescriptor,
    LogicalLayoutHandle,
    WorkerAddress,
)
from kvblocks.transfer.notification import TransferCompleteNotification
from kvblocks.transfer.options import (
    NativeVsNixlPolicy,
    TransferCapabilities,
    TransferOptions,
    TransferPreferences,
)
from kvblocks.transfer.peers import Peers
from kvblocks.transfer.pools import DeviceMemoryPool, StreamPool
from kvblocks.transfer.runner import Runner
from kvblocks.transfer.serialize import SerializedLayout
from kvblocks.transfer.strategy import Route, RoutePolicy, Strategy, route


@dataclass(frozen=True)
class TransferConfig:
    """Settings of a TransferManager (see :class:`TransferManagerBuilder`)."""

    worker_id: int | None = None
    agent_name: str = "kvblocks"
    cuda_device_id: int = 0
    capabilities: TransferCapabilities = field(default_factory=TransferCapabilities)
    preferences: TransferPreferences = field(default_factory=TransferPreferences)
    cuda_pool_reserve_size: int = 0
    cuda_pool_release_threshold: int | None = None
    io_threads: int = 8
    workers: int = 4
    nixl_backends: tuple[str, ...] = ()


class TransferManagerBuilder:
    """Fluent settings for a :class:`TransferManager`; each method returns the builder."""

    def __init__(self) -> None:
        self._config = TransferConfig()

    def _set(self, **changes) -> TransferManagerBuilder:
        self._config = replace(self._config, **changes)
        return self

    def worker_id(self, worker_id: int) -> TransferManagerBuilder:
        """This worker's 64-bit id (random by default)."""
        return self._set(worker_id=worker_id)

    def agent_name(self, name: str) -> TransferManagerBuilder:
        return self._set(agent_name=name)

    def cuda_device_id(self, device_id: int) -> TransferManagerBuilder:
        return self._set(cuda_device_id=device_id)

    def capabilities(self, capabilities: TransferCapabilities) -> TransferManagerBuilder:
        return self._set(capabilities=capabilities)

    def preferences(self, preferences: TransferPreferences) -> TransferManagerBuilder:
        return self._set(preferences=preferences)

    def cuda_pool_reserve_size(self, nbytes: int) -> TransferManagerBuilder:
        """Device memory kept for transfer temporaries from the start."""
        return self._set(cuda_pool_reserve_size=nbytes)

    def cuda_pool_release_threshold(self, nbytes: int | None) -> TransferManagerBuilder:
        """Temporaries given back beyond this many kept bytes are freed."""
        return self._set(cuda_pool_release_threshold=nbytes)

    def nixl_backend(self, name: str) -> TransferManagerBuilder:
        """Give the manager a NIXL agent with this backend plugin (``"UCX"``, ``"LIBFABRIC"``,
        ...; case does not matter); call again to add another."""
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError("nixl_backend", f"must be a plugin name, got {name!r}")
        backends = self._config.nixl_backends
        if name.upper() in backends:
            return self
        return self._set(nixl_backends=(*backends, name.upper()))

    def io_threads(self, count: int) -> TransferManagerBuilder:
        """Threads for disk I/O and host copies."""
        return self._set(io_threads=count)

    def build(self) -> TransferManager:
        return TransferManager(self._config)


class TransferManager:
    """Moves blocks between registered layouts; see the module documentation."""

    def __init__(self, config: TransferConfig | None = None) -> None:
        config = config or TransferConfig()
        for name in ("io_threads", "workers"):
            positive_int(getattr(config, name), name)
        if config.preferences.native_vs_nixl is NativeVsNixlPolicy.PREFER_NIXL:
            raise InvalidArgumentError(
                "preferences.native_vs_nixl",
                "PREFER_NIXL is not offered: transfers between this worker's memories take the"
                " native paths (remote layouts always move through NIXL)",
            )
        worker_id = config.worker_id if config.worker_id is not None else secrets.randbits(64)
        self.config = replace(config, worker_id=worker_id)
        self.address = WorkerAddress(worker_id, config.agent_name)
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            if not 0 <= config.cuda_device_id < count:
                raise InvalidArgumentError(
                    "cuda_device_id", f"must be in [0, {count}), got {config.cuda_device_id}"
                )
            self.device = torch.device("cuda", config.cuda_device_id)
            self.streams: StreamPool | None = StreamPool(self.device)
            self.memory_pool: DeviceMemoryPool | None = DeviceMemoryPool(
                self.device, config.cuda_pool_reserve_size, config.cuda_pool_release_threshold
            )
        else:
            self.device = torch.device("cpu")
            self.streams = None
            self.memory_pool = None
        self._layouts: dict[LayoutHandle, PhysicalLayout] = {}
        #: Which layout serves each tier, per worker id (this one's and imported ones).
        self._tiers: dict[tuple[int, LogicalLayoutHandle], LayoutHandle] = {}
        self._next_id = itertools.count(1)
        self._lock = threading.Lock()
        #: This worker's NIXL agent; ``None`` unless the config names NIXL backends.
        self.nixl: NixlAgent | None = None
        self._peers: Peers | None = None
        if config.nixl_backends:
            self.nixl = NixlAgent(config.agent_name, config.nixl_backends)
            self._peers = Peers(self.nixl)
        thresholds = {}
        for name in ("copy_engine_min_bytes", "staged_min_bytes"):
            value = getattr(config.preferences, name)
            if value is not None:
                non_negative_int(value, f"preferences.{name}")
            thresholds[name] = value if has_cuda_bindings() else None
        self._policy = RoutePolicy(
            copy_engine=config.preferences.copy_engine,
            nixl=self.nixl is not None,
            gpu_rdma=config.capabilities.allow_gpu_rdma,
            **thresholds,
        )
        self._runner = Runner(
            self.device,
            self.streams,
            self.memory_pool,
            self.nixl,
            self._peers,
            config.io_threads,
            config.workers,
        )

    @staticmethod
    def builder() -> TransferManagerBuilder:
        return TransferManagerBuilder()

    # Registration ----------------------------------------------------------------------------

    def register_layout(self, physical: PhysicalLayout) -> LayoutHandle:
        """Make ``physical`` addressable by transfers; returns its handle on this worker.

        With a NIXL agent, a memory layout is also registered with NIXL (so other workers can
        reach it once they import its export).
        """
        if not isinstance(physical, PhysicalLayout):
            raise InvalidArgumentError("physical", f"must be a PhysicalLayout, got {physical!r}")
        physical.check_alive()
        with self._lock:
            for handle, known in self._layouts.items():
                if known is physical:
                    return handle
            handle = LayoutHandle(self.address.worker_id, next(self._next_id))
            self._layouts[handle] = physical
        if self._peers is not None:
            try:
                self._peers.register(handle, physical)
            except BaseException:
                with self._lock:
                    del self._layouts[handle]
                raise
        return handle

    def layout(self, handle: LayoutHandle) -> PhysicalLayout:
        """The layout registered under ``handle``."""
        return self._get(handle, "handle")

    def release_layout(self, handle: LayoutHandle) -> None:
        """Forget ``handle`` and free the storage its layout allocated."""
        physical = self._get(handle, "handle")
        with self._lock:
            del self._layouts[handle]
            self._tiers = {key: h for key, h in self._tiers.items() if h != handle}
        if self._peers is not None:
            self._peers.release(handle, physical)
        physical.release()

    def export_layout(self, handle: LayoutHandle) -> SerializedLayout:
        """The description another worker needs to address this layout (with the NIXL
        metadata of its memory, where the manager has an agent)."""
        physical = self._get(handle, "handle")
        metadata = self._peers.metadata(handle) if self._peers is not None else None
        tier = self._tier_of(handle)
        return SerializedLayout.of(physical, self.address, metadata, tier)

    def import_layout(self, serialized: SerializedLayout) -> LayoutHandle:
        """Register another worker's layout as remote storage, moved through NIXL.

        Without a NIXL agent here, or NIXL metadata in ``serialized``, the layout is known
        but transfers to and from it raise :class:`BackendUnavailableError`.

        Raises:
            InvalidArgumentError: ``serialized`` describes a file or a remote layout (other
                workers reach only memory), or is not a SerializedLayout.
            SerializationError: NIXL could not load its metadata.
        """
        if not isinstance(serialized, SerializedLayout):
            raise InvalidArgumentError(
                "serialized", f"must be a SerializedLayout, got {serialized!r}"
            )
        if serialized.storage in (StorageKind.DISK, StorageKind.REMOTE):
            raise InvalidArgumentError(
                "serialized",
                f"describes {serialized.storage.value} storage; other workers reach only memory",
            )
        builder = PhysicalLayout.builder(serialized.config).kv_format(serialized.kv_format)
        builder.of_kind(serialized.kind, serialized.block_dim)
        physical = builder.with_remote_regions(serialized.regions).build()
        if self._peers is not None:
            self._peers.add_import(physical, serialized)
        with self._lock:
            handle = LayoutHandle(serialized.worker.worker_id, next(self._next_id))
            self._layouts[handle] = physical
            if serialized.tier is not None:  # a newer import of the worker's tier replaces one
                self._tiers[(serialized.worker.worker_id, serialized.tier)] = handle
        return handle

    def nixl_notifications(self) -> dict[str, list[bytes]]:
        """Messages other workers' NIXL transfers delivered here (their
        ``nixl_write_notification``) and not returned before, by their agent names.

        Raises:
            BackendUnavailableError: the manager has no NIXL agent.
        """
        return self._agent().notifications()

    def wait_for_nixl_notification(
        self, agent: str, message: bytes, timeout: float | None = None
    ) -> None:
        """Wait until ``message`` arrives from the worker whose NIXL agent is ``agent`` (its
        ``WorkerAddress.agent_name``): the bytes its transfer carried have then landed here.

        Raises:
            BackendUnavailableError: the manager has no NIXL agent.
            TimeoutError: the message did not arrive within ``timeout`` seconds.
        """
        if not isinstance(message, bytes):
            raise InvalidArgumentError("message", f"must be bytes, got {message!r}")
        self._agent().wait_for(agent, message, timeout)

    def _agent(self) -> NixlAgent:
        if self.nixl is None:
            raise BackendUnavailableError(
                "this manager has no NIXL agent: build it with .nixl_backend('UCX')"
            )
        return self.nixl

    def build_logical_descriptor(
        self, handle: LayoutHandle, tier: LogicalLayoutHandle
    ) -> LogicalLayoutDescriptor:
        """Tie a layout of this worker to the tier it serves: its exports then name the tier,
        and :meth:`resolve` finds it by tier here and on the workers that import it.

        Raises:
            InvalidArgumentError: another layout of this worker serves ``tier``, this one serves
                another tier, or ``handle`` is an imported layout.
        """
        self._get(handle, "handle")
        if not isinstance(tier, LogicalLayoutHandle):
            raise InvalidArgumentError("tier", f"must be a LogicalLayoutHandle, got {tier!r}")
        if handle.worker_id != self.address.worker_id:
            raise InvalidArgumentError("handle", f"{handle} is another worker's layout")
        key = (handle.worker_id, tier)
        with self._lock:
            current = self._tiers.get(key)
            served = self._tier_of(handle)
            if current not in (None, handle):
                raise InvalidArgumentError(
                    "tier", f"{tier.value} is served by {current}; release that layout first"
                )
            if served not in (None, tier):
                raise InvalidArgumentError("handle", f"{handle} serves {served.value} already")
            self._tiers[key] = handle
        return LogicalLayoutDescriptor(handle, tier)

    def resolve(self, worker_id: int, tier: LogicalLayoutHandle) -> LayoutHandle:
        """The layout that serves ``tier`` on worker ``worker_id`` (this one, or one whose
        export this manager imported), so that callers can say "G1 of worker A -> G2 of B".

        Raises:
            InvalidArgumentError: no such layout is known here.
        """
        if not isinstance(tier, LogicalLayoutHandle):
            raise InvalidArgumentError("tier", f"must be a LogicalLayoutHandle, got {tier!r}")
        handle = self._tiers.get((worker_id, tier))
        if handle is None:
            raise InvalidArgumentError(
                "tier",
                f"no layout of worker {worker_id:x} serving {tier.value} is known here"
                " (build_logical_descriptor there, then export and import the layout)",
            )
        return handle

    def _tier_of(self, handle: LayoutHandle) -> LogicalLayoutHandle | None:
        for (_, tier), known in list(self._tiers.items()):
            if known == handle:
                return tier
        return None

    def _get(self, handle: LayoutHandle, argument: str) -> PhysicalLayout:
        if not isinstance(handle, LayoutHandle):
            raise InvalidArgumentError(argument, f"must be a LayoutHandle, got {handle!r}")
        physical = self._layouts.get(handle)
        if physical is None:
            raise InvalidArgumentError(argument, f"{handle} is not registered with this manager")
        physical.check_alive()
        return physical

    # Transfers -------------------------------------------------------------------------------

    def strategy(
        self,
        src: LayoutHandle,
        dst: LayoutHandle,
        options: TransferOptions | None = None,
        num_blocks: int = 1,
    ) -> Strategy:
        """The strategy a transfer of ``num_blocks`` blocks from ``src`` to ``dst`` with
        ``options`` would take (whole pinned blocks to or from device memory take the copy
        engine from ``copy_engine_min_bytes`` or ``staged_min_bytes`` up, the kernel below),
        for blocks with neighbouring ids."""
        options = options or TransferOptions()
        ids = torch.arange(positive_int(num_blocks, "num_blocks"), dtype=torch.int64)
        sides = []
        for handle, override, name in (
            (src, options.src_kv_layout, "src"),
            (dst, options.dst_kv_layout, "dst"),
        ):
            physical = self._get(handle, name)
            sides.append(Side(physical, ids, kv_format(physical, override, f"{name}_kv_layout")))
        layers = sides[0].physical.layout.layer_range(options.layer_range)
        return route(*sides, self._policy, layers).strategy

    def execute_transfer(
        self,
        src: LayoutHandle,
        src_ids: Iterable[int] | torch.Tensor,
        dst: LayoutHandle,
        dst_ids: Iterable[int] | torch.Tensor,
        options: TransferOptions | None = None,
    ) -> TransferCompleteNotification:
        """Copy blocks ``src_ids`` of ``src`` into blocks ``dst_ids`` of ``dst``.

        Args:
            src, dst: registered layouts with the same block shape (``num_blocks`` may differ).
            src_ids, dst_ids: equally many block ids; ``dst_ids`` without repeats.
            options: layer range, format overrides, bounce buffer, caller stream.

        Returns:
            A notification to await, wait on or poll.

        Raises:
            InvalidArgumentError (and subclasses): a bad argument; nothing was moved.
            BackendUnavailableError: a remote layout, and no NIXL agent here or no NIXL
                metadata in its import.
        """
        options = checked_options(options)
        src_side, dst_side, layers = self._prepare(src, src_ids, dst, dst_ids, options)
        if src_side.ids.numel() == 0:
            return TransferCompleteNotification.ready()
        plan = self._route(src_side, dst_side, layers)
        message = self._nixl_message(options, plan, src_side, dst_side)
        check_overlap = share_memory(src_side.physical, dst_side.physical)
        if plan.strategy.stays_on_gpu:
            (done,) = self._runner.on_stream(plan, [layers], options, check_overlap, marks=False)
            return done
        return self._start_steps(plan, src_side, layers, options, check_overlap, message)

    def execute_layer_groups(
        self,
        src: LayoutHandle,
        src_ids: Iterable[int] | torch.Tensor,
        dst: LayoutHandle,
        dst_ids: Iterable[int] | torch.Tensor,
        groups: Sequence[range],
        options: TransferOptions | None = None,
    ) -> tuple[TransferCompleteNotification, ...]:
        """Copy blocks ``src_ids`` of ``src`` into blocks ``dst_ids`` of ``dst`` as
        :meth:`execute_transfer` does, one group of layers after another, so that a reader
        can start on the first layers while the others are on the way.

        The blocks are checked, routed and staged once for all groups (one set of staging
        slots, the copies of each group issued right after the previous group's), which costs
        the host far less than one :meth:`execute_transfer` per group. Groups whose routes
        differ by their size still go in order, on one stream; groups with CPU or disk steps
        run on worker threads and may overlap.

        Args:
            groups: layer ranges (step 1, within the layouts' layers), moved in this order.
            options: as for :meth:`execute_transfer`, without ``layer_range`` (``groups``
                gives the layers), ``bounce_buffer`` or ``nixl_write_notification``. With
                ``cuda_stream``, an event per group is recorded on it.

        Returns:
            A notification per group, complete once its layers are in place.

        Raises:
            InvalidArgumentError (and subclasses): a bad argument; nothing was moved.
            BackendUnavailableError: as for :meth:`execute_transfer`.
        """
        options = checked_options(options)
        for name in ("layer_range", "bounce_buffer", "nixl_write_notification"):
            if getattr(options, name) is not None:
                raise InvalidArgumentError(
                    f"options.{name}",
                    "must be None for a transfer in layer groups"
                    + (": groups gives the layers" if name == "layer_range" else ""),
                )
        if isinstance(groups, range) or not isinstance(groups, Sequence) or not groups:
            raise InvalidArgumentError(
                "groups", f"must be a non-empty sequence of ranges, got {groups!r}"
            )
        src_side, dst_side, _ = self._prepare(src, src_ids, dst, dst_ids, options)
        layout = src_side.physical.layout
        layer_groups = [
            layer_group(layout, group, f"groups[{i}]") for i, group in enumerate(groups)
        ]
        if src_side.ids.numel() == 0:
            return tuple(TransferCompleteNotification.ready() for _ in layer_groups)
        # A route depends on how many layers move, not which: one per group size (the
        # groups of a BlockManager have at most two sizes).
        by_size: dict[int, Route] = {}
        for i, layers in enumerate(layer_groups):
            if len(layers) not in by_size:
                by_size[len(layers)] = self._route(src_side, dst_side, layers, f"groups[{i}]")
        plans = [by_size[len(layers)] for layers in layer_groups]
        self._nixl_message(options, plans[0], src_side, dst_side)  # the groups share one peer
        check_overlap = share_memory(src_side.physical, dst_side.physical)
        if all(plan == plans[0] for plan in plans) and plans[0].strategy.stays_on_gpu:
            return tuple(
                self._runner.on_stream(plans[0], layer_groups, options, check_overlap, marks=True)
            )
        # Routes that differ by the groups' sizes, or steps on worker threads: group by group.
        if all(plan.strategy.stays_on_gpu for plan in plans) and options.cuda_stream is None:
            # One pool stream for all of them, so that the groups still land in order.
            device, stream = self._runner.gpu_stream(plans[0].hops[0][1], plans[0].hops[-1][2])
            wait_for(stream, torch.cuda.current_stream(device))
            options = replace(options, cuda_stream=stream)
        done = []
        for plan, layers in zip(plans, layer_groups, strict=True):
            if plan.strategy.stays_on_gpu:
                done += self._runner.on_stream(plan, [layers], options, check_overlap, marks=True)
            else:
                done.append(self._start_steps(plan, src_side, layers, options, check_overlap, None))
        return tuple(done)

    def _route(self, src: Side, dst: Side, layers: range, argument: str = "layer_range") -> Route:
        """The route of layers ``layers`` of the blocks from ``src`` to ``dst``.

        Raises:
            InvalidArgumentError: some layers (given as ``argument``) change their format on a
                route that moves whole blocks only.
            BackendUnavailableError: see :func:`route`.
        """
        plan = route(src, dst, self._policy, layers)
        some = len(layers) < src.config.num_layers
        if some and src.fmt.requires_transform(dst.fmt) and plan.strategy not in _SOME_LAYERS:
            raise InvalidArgumentError(
                argument,
                "must cover every layer when the block format changes on the way through"
                f" {plan.strategy.value} (only a kernel or host permute, alone or out of or into"
                " staging slots, moves part of a block)",
            )
        return plan

    def _nixl_message(
        self, options: TransferOptions, plan: Route, src: Side, dst: Side
    ) -> bytes | None:
        """The checked ``nixl_write_notification``; checks that a remote side was imported
        with NIXL metadata."""
        nixl = plan.strategy in (Strategy.NIXL, Strategy.NIXL_BOUNCE)
        message = options.nixl_write_notification
        if message is not None and (not nixl or not isinstance(message, bytes)):
            problem = "must be bytes" if nixl else "applies only to transfers with a remote layout"
            raise InvalidArgumentError("nixl_write_notification", f"{problem}, got {message!r}")
        for side, name in ((src, "src"), (dst, "dst")):
            if side.physical.storage is StorageKind.REMOTE:
                self._peers.target(side.physical, name)
        return message

    def _prepare(self, src, src_ids, dst, dst_ids, options: TransferOptions):
        """The checked sides of a transfer between registered ``src`` and ``dst``, and its
        layers (see :func:`~kvblocks.transfer.arguments.transfer_sides`)."""
        src_physical, dst_physical = self._get(src, "src"), self._get(dst, "dst")
        return transfer_sides(src_physical, src_ids, dst_physical, dst_ids, options)

    def _start_steps(
        self,
        plan: Route,
        src: Side,
        layers: range,
        options: TransferOptions,
        check_overlap: bool,
        message: bytes | None,
    ) -> TransferCompleteNotification:
        """Start a transfer with CPU, disk or NIXL steps on a worker thread (through the
        caller's bounce buffer, where ``options`` names one)."""
        if options.cuda_stream is not None:
            raise InvalidArgumentError(
                "cuda_stream",
                f"applies only to transfers that stay on the GPU, not {plan.strategy.value}",
            )
        bounce = None
        if options.bounce_buffer is not None:
            physical = self._get(options.bounce_buffer.handle, "bounce_buffer")
            bounce = bounce_side(physical, options.bounce_buffer, src)
        return self._runner.start_steps(plan, src, layers, check_overlap, bounce, message)

    def close(self) -> None:
        """Finish running transfers, stop the worker threads and close the NIXL agent (the
        layouts it registered must still be allocated)."""
        self._runner.close()
        if self.nixl is not None:
            self.nixl.close()

    def __enter__(self) -> TransferManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: Routes that can change the format of some layers of a block: one permute (kernel or host),
#: or the permute kernel out of or into staging slots that hold those layers.
_SOME_LAYERS = (Strategy.KERNEL, Strategy.HOST_COPY, Strategy.STAGED)
