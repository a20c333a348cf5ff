"""Running a routed transfer: on the GPU's streams when every step stays there, else on a
worker thread that runs its steps one after another (GPU, copy engine, host, disk, NIXL).

A :class:`Runner` owns what the steps run on: the stream pool, the device memory pool that
staging slots come from, pinned bounce buffers, the threads for disk I/O and host copies, and
the worker threads. Its callers have checked and routed the transfer
(:mod:`~kvblocks.transfer.arguments`, :func:`~kvblocks.transfer.strategy.route`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch

from kvblocks.errors import InvalidArgumentError, TransferError
from kvblocks.kernels.cuda_calls import StreamEvent, wait_for
from kvblocks.layout import LayoutConfig
from kvblocks.remote import NixlAgent
from kvblocks.storage import PhysicalLayout
from kvblocks.storage.disk import io_pool
from kvblocks.transfer.executor import (
    BouncePool,
    Hop,
    HopKind,
    Side,
    run_copy_engine,
    run_disk,
    run_gpu,
    run_host,
    run_nixl,
)
from kvblocks.transfer.notification import TransferCompleteNotification
from kvblocks.transfer.options import TransferOptions
from kvblocks.transfer.peers import Peers
from kvblocks.transfer.pools import DeviceMemoryPool, StreamPool
from kvblocks.transfer.staging import run_staged, slot_bytes, slot_layout
from kvblocks.transfer.strategy import Bounce, Route, Strategy


class Runner:
    """Runs routed transfers (see the module docstring).

    Args:
        device: this manager's CUDA device (the CPU without a GPU).
        streams, memory_pool: the GPU's stream pool and temporaries (None without a GPU).
        nixl, peers: the NIXL agent and the layouts it reaches (None without one).
        io_threads: threads for disk I/O and host copies.
        workers: threads that run transfers with CPU, disk or NIXL steps.
    """

    def __init__(
        self,
        device: torch.device,
        streams: StreamPool | None,
        memory_pool: DeviceMemoryPool | None,
        nixl: NixlAgent | None,
        peers: Peers | None,
        io_threads: int,
        workers: int,
    ) -> None:
        self._device = device
        self._streams = streams
        self._memory_pool = memory_pool
        self._nixl = nixl
        self._peers = peers
        self._bounces = BouncePool(agent=nixl)
        self._io = io_pool(io_threads)
        self._workers = ThreadPoolExecutor(workers, thread_name_prefix="kvblocks-transfer")

    def gpu_stream(self, src: Side, dst: Side) -> tuple[torch.device, torch.cuda.Stream]:
        """The GPU of a GPU step from ``src`` to ``dst``, and the pool stream it runs on."""
        gpu = src if src.on_gpu else dst
        stream = self._streams.h2d() if dst.on_gpu else self._streams.d2h()
        return gpu.physical.device, stream

    def on_stream(
        self,
        plan: Route,
        groups: list[range],
        options: TransferOptions,
        check_overlap: bool,
        marks: bool,
    ) -> list[TransferCompleteNotification]:
        """Enqueue a transfer that stays on the GPU, layer group after layer group, on the
        caller's stream or else a pool stream; a notification per group. With ``marks``, a
        caller's stream gets an event per group too, else those notifications are complete
        at once (the caller synchronizes).

        Raises:
            InvalidArgumentError: ``options.cuda_stream`` is not a stream of the transfer's GPU.
        """
        device, stream = self.gpu_stream(plan.hops[0][1], plan.hops[-1][2])
        caller = options.cuda_stream
        if caller is not None:
            if not isinstance(caller, torch.cuda.Stream):
                raise InvalidArgumentError(
                    "cuda_stream", f"must be a torch.cuda.Stream, got {caller!r}"
                )
            if caller.device != device:
                raise InvalidArgumentError(
                    "cuda_stream", f"is a stream of {caller.device}; this transfer runs on {device}"
                )
        stream = caller or stream  # the pool's stream is skipped then
        if caller is None:
            wait_for(stream, torch.cuda.current_stream(device))
        marks = marks or caller is None
        with torch.cuda.stream(stream):  # makes the stream's device current, too
            if plan.strategy is Strategy.STAGED:
                events = self._staged_on(plan, groups, stream)
            else:
                (hop,) = plan.with_buffers({})
                events = []
                for layers in groups:
                    _run_gpu_hop(hop, layers, device, stream, check_overlap)
                    if marks:
                        events.append(StreamEvent.recorded(stream))
        if not marks:
            return [TransferCompleteNotification.ready() for _ in groups]
        return [TransferCompleteNotification.from_event(event) for event in events]

    def start_steps(
        self,
        plan: Route,
        src: Side,
        layers: range,
        check_overlap: bool,
        bounce: Side | None,
        message: bytes | None,
    ) -> TransferCompleteNotification:
        """Start a transfer with CPU, disk or NIXL steps on a worker thread, after the work
        queued so far on the current stream; its pinned bounce goes through ``bounce`` where
        given, else through a buffer of the pool."""
        after = None
        if self._streams is not None:
            after = StreamEvent.recorded(torch.cuda.current_stream(self._device))
        future = self._workers.submit(
            self._run_steps, plan, src, layers, after, check_overlap, bounce, message
        )
        return TransferCompleteNotification.from_future(future)

    def close(self) -> None:
        """Finish running transfers and stop the threads."""
        self._workers.shutdown(wait=True)
        self._io.shutdown(wait=True)

    def _staged_on(
        self, plan: Route, groups: list[range], stream: torch.cuda.Stream
    ) -> list[StreamEvent]:
        """Enqueue a staged transfer of layer ``groups`` on ``stream`` (and a set of copy
        streams of the pool), through slots from the memory pool; returns an event per group
        that marks it done."""
        (_, src, _), (_, _, dst) = plan.hops
        (slot,) = plan.bounces()
        pool = self._memory_pool
        buffer = pool.acquire(slot_bytes(src, groups))

        def slots(config: LayoutConfig) -> PhysicalLayout:
            return pool.memo(
                buffer, (config, slot.fmt), lambda: slot_layout(config, slot.fmt, buffer)
            )

        done = run_staged(src, dst, slots, stream, self._streams.copies(), groups)
        finished = StreamEvent.recorded(stream)  # on the stream that waits for every step
        pool.release_after(buffer, finished)
        return done

    def _run_steps(
        self,
        plan: Route,
        src: Side,
        layers: range,
        after: StreamEvent | None,
        check_overlap: bool,
        bounce: Side | None,
        message: bytes | None,
    ) -> None:
        buffers: dict[Bounce, Side] = {}
        pinned = []  # what this transfer took from the pool
        try:
            for needed in plan.bounces():  # pinned bounces (device slots are STAGED's)
                if bounce is not None:
                    buffers[needed] = replace(bounce, fmt=needed.fmt)
                    bounce = None
                else:
                    buffers[needed] = self._bounces.take(src, needed.fmt)
                    pinned.append(buffers[needed])
            for hop in plan.with_buffers(buffers):
                if hop.kind in (HopKind.GPU, HopKind.COPY_ENGINE):
                    device, stream = self.gpu_stream(hop.src, hop.dst)
                    with torch.cuda.device(device):
                        if after is not None:
                            after.wait(stream)
                        with torch.cuda.stream(stream):
                            _run_gpu_hop(hop, layers, device, stream, check_overlap)
                        stream.synchronize()
                elif hop.kind in (HopKind.NIXL_READ, HopKind.NIXL_WRITE):
                    if after is not None:  # the engine's writes of GPU memory NIXL reads
                        after.synchronize()
                    remote, name = (
                        (hop.src, "src") if hop.kind is HopKind.NIXL_READ else (hop.dst, "dst")
                    )
                    target = self._peers.target(remote.physical, name)
                    run_nixl(hop, layers, self._nixl, target, message)
                elif hop.kind is HopKind.HOST:
                    run_host(hop, layers, self._io)
                else:
                    run_disk(hop, layers, self._io)
        except Exception as exc:
            raise TransferError(f"{plan.strategy.value} transfer failed: {exc}") from exc
        finally:  # every GPU step was synchronized: the buffers are free to reuse
            for side in pinned:
                self._bounces.give_back(side)


def _run_gpu_hop(hop: Hop, layers: range, device, stream, check_overlap: bool) -> None:
    if hop.kind is HopKind.COPY_ENGINE:
        run_copy_engine(hop, layers, stream, check_overlap)
    else:
        run_gpu(hop, layers, device, check_overlap)
