"""A NIXL agent: registers local memory, loads other workers' metadata, READs and WRITEs.

One :class:`NixlAgent` per TransferManager. Another worker's memory is addressed by its NIXL
agent name, its kind (``DRAM`` or ``VRAM``) and, for ``VRAM``, its GPU. Each registration is
exported as :class:`NixlMetadata`: the first one loaded from an agent brings its connection
info, later ones only add memory. (NIXL refuses connection info that differs from what it
loaded for an agent, and UCX's changes as the agent's transports come up; NIXL also keeps the
first registration it saw of any region: see :meth:`NixlAgent.connect`.)

Descriptors are ``(address, bytes, device id)`` tuples, as NIXL takes them: a list per side,
entry ``i`` of the local list paired with entry ``i`` of the remote list.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import ModuleType, SimpleNamespace

from kvblocks.errors import (
    BackendUnavailableError,
    InvalidArgumentError,
    SerializationError,
    TransferError,
)
from kvblocks.layout import MemoryRegion

#: Where the NIXL Python API may be found: the ``nixl`` package picks the build for the CUDA
#: version torch reports; a build installed on its own is importable by its own name.
_API_MODULES = ("nixl._api", "nixl_cu13._api", "nixl_cu12._api")

#: ``(address, bytes, device id)``: one region of a transfer.
Descriptor = tuple[int, int, int]

#: Seconds between polls of a running transfer, growing from the first to the last.
_POLL_FIRST, _POLL_LAST = 20e-6, 1e-3

#: Microseconds an agent's progress thread waits for a message before it polls anyway.
#: NIXL's Python API asks for 0, which makes the thread spin a core for as long as the agent
#: lives; the thread also wakes as soon as a message arrives, so a longer wait costs idle CPU
#: nothing and transfers no latency (NIXL rounds it up to whole milliseconds).
PROGRESS_WAIT_US = 1000


class MemKind(Enum):
    """NIXL's names for the memory a descriptor points into."""

    DRAM = "DRAM"
    """Host memory (pinned or pageable)."""
    VRAM = "VRAM"
    """GPU memory."""


class NixlOp(Enum):
    READ = "READ"
    """Bytes of the remote descriptors into the local ones."""
    WRITE = "WRITE"
    """Bytes of the local descriptors into the remote ones."""


@dataclass(frozen=True)
class NixlMetadata:
    """What another agent loads to reach one registration of this agent.

    Attributes:
        with_connection: the agent's connection info and the registered memory.
        memory: the registered memory only (for an agent that is already connected).
    """

    with_connection: bytes = field(repr=False)
    memory: bytes = field(repr=False)


@dataclass(frozen=True)
class RemoteMemory:
    """Where another worker's layout lives: its agent, memory kind and GPU (0 for ``DRAM``)."""

    agent: str
    kind: MemKind
    device_id: int


@dataclass(frozen=True)
class _Loaded:
    """One registration of another agent, as loaded here."""

    kind: MemKind
    regions: tuple[MemoryRegion, ...]
    metadata: NixlMetadata

    def overlaps(self, other: _Loaded) -> bool:
        return self.kind is other.kind and any(
            a.overlaps(b) for a in self.regions for b in other.regions
        )


@dataclass
class _Peer:
    """What NIXL holds for another agent since this agent connected to it: the registrations
    of live imports by key, and those of released ones."""

    live: dict[object, _Loaded]
    released: list[_Loaded]


def memory_of(device) -> tuple[MemKind, int]:
    """NIXL's memory kind and device id for memory on ``device`` (a torch device; ``None`` or
    a CPU device for host memory)."""
    if device is not None and device.type == "cuda":
        return MemKind.VRAM, device.index or 0
    return MemKind.DRAM, 0


def _pauses() -> Iterator[float]:
    """Seconds to sleep between polls: doubling from the first to the last, then the last."""
    pause = _POLL_FIRST
    while True:
        yield pause
        pause = min(pause * 2, _POLL_LAST)


def load_api() -> ModuleType:
    """The NIXL Python API module.

    NIXL's Python logger writes to standard output; it is pointed at standard error here, so
    that a program's output (such as the CSV of ``kvblocks bench``) stays its own.

    Raises:
        BackendUnavailableError: NIXL is not installed.
    """
    for name in _API_MODULES:
        try:
            api = importlib.import_module(name)
        except ImportError:
            continue
        for handler in logging.getLogger("nixl").handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                handler.setStream(sys.stderr)
        return api
    raise BackendUnavailableError(
        "NIXL is not installed: pip install 'kvblocks[remote]' (or nixl-cu12 / nixl-cu13)"
    )


@functools.cache
def _waiting_agent(api: ModuleType) -> type:
    """``api.nixl_agent`` whose progress thread waits :data:`PROGRESS_WAIT_US` between polls.

    The API's constructor fills a ``nixlBind.nixlAgentConfig`` and sets its ``pthrDelay`` to 0;
    this class runs that same constructor with a config type that raises the wait and changes
    nothing else. A NIXL release that builds its agents another way gets its own class back.
    """
    bindings = getattr(api, "nixlBind", None)
    constructor = api.nixl_agent.__init__
    if bindings is None or "nixlBind" not in constructor.__code__.co_names:
        return api.nixl_agent

    class WaitingConfig(bindings.nixlAgentConfig):
        def __setattr__(self, name: str, value) -> None:
            if name == "pthrDelay":
                value = max(value, PROGRESS_WAIT_US)
            super().__setattr__(name, value)

    names = SimpleNamespace(**vars(bindings))
    names.nixlAgentConfig = WaitingConfig
    waiting_init = type(constructor)(
        constructor.__code__,
        {**vars(api), "nixlBind": names},
        constructor.__name__,
        constructor.__defaults__,
        constructor.__closure__,
    )
    return type("nixl_agent", (api.nixl_agent,), {"__init__": waiting_init})


def installed_package() -> str | None:
    """The first NIXL package found installed (without importing it), or ``None``."""
    for name in _API_MODULES:
        package = name.split(".")[0]
        if importlib.util.find_spec(package) is not None:
            return package
    return None


def nixl_available() -> bool:
    """Whether the NIXL Python API can be imported here."""
    try:
        load_api()
    except BackendUnavailableError:
        return False
    return True


class NixlAgent:
    """This worker's NIXL agent (see the module documentation). Thread safe: every call into
    NIXL holds one lock, and a transfer in progress is polled without it held."""

    def __init__(self, name: str, backends: Sequence[str]) -> None:
        """Create the agent ``name`` with ``backends`` (plugin names such as ``"UCX"``).

        Raises:
            BackendUnavailableError: NIXL is missing, or it has no plugin of that name.
        """
        api = load_api()
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError("agent_name", f"must be a non-empty str, got {name!r}")
        self.name = name
        self._lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}
        self._inbox: dict[str, list[bytes]] = {}
        self._registered: dict[int, object] = {}  # id -> registration, until deregistered
        config = api.nixl_agent_config(backends=list(backends))
        self._nixl = _waiting_agent(api)(name, config)
        missing = [b for b in backends if b not in self._nixl.backends]
        if missing:
            plugins = ", ".join(self._nixl.get_plugin_list()) or "none"
            raise BackendUnavailableError(
                f"NIXL has no backend {missing[0]!r} here (plugins found: {plugins})"
            )

    @property
    def _agent(self):
        """NIXL's agent object, until :meth:`close`."""
        if self._nixl is None:
            raise BackendUnavailableError(f"the NIXL agent {self.name!r} was closed")
        return self._nixl

    def close(self) -> None:
        """Deregister the memory still registered, disconnect from every agent and let NIXL's
        agent go (its progress thread stops with it). Idempotent; the memory must still be
        allocated. Later calls raise :class:`BackendUnavailableError`; :meth:`deregister`
        becomes a no-op."""
        with self._lock:
            if self._nixl is None:
                return
            for registration in self._registered.values():
                self._nixl.deregister_memory(registration)
            for agent in self._peers:
                self._nixl.remove_remote_agent(agent)
            self._registered.clear()
            self._peers.clear()
            self._nixl = None

    def metadata(self, registration) -> NixlMetadata:
        """What another agent loads to reach ``registration`` (from :meth:`register`)."""
        with self._lock:
            return NixlMetadata(
                bytes(self._agent.get_partial_agent_metadata(registration, True)),
                bytes(self._agent.get_partial_agent_metadata(registration, False)),
            )

    def register(self, regions: Sequence[MemoryRegion], kind: MemKind, device_id: int):
        """Register ``regions`` for transfers; returns what :meth:`deregister` takes."""
        rows = [(r.addr, r.size, device_id, "") for r in regions]
        with self._lock:
            registration = self._agent.register_memory(rows, kind.value)
            self._registered[id(registration)] = registration
            return registration

    def deregister(self, registration) -> None:
        """End ``registration`` (from :meth:`register`); after :meth:`close`, nothing to do."""
        with self._lock:
            if self._registered.pop(id(registration), None) is not None:
                self._agent.deregister_memory(registration)

    def connect(
        self,
        agent: str,
        key: object,
        memory: RemoteMemory,
        regions: Sequence[MemoryRegion],
        metadata: NixlMetadata,
    ) -> None:
        """Load the metadata of one registration of ``agent`` (its ``regions`` of ``memory``),
        kept under ``key`` (one per import), connecting to the agent the first time.

        NIXL keeps what it loaded for an agent until it disconnects from it, and keeps the
        first registration it saw of any region. Memory that overlaps memory loaded before
        (freed by the agent and registered again since) therefore starts the connection
        again: this registration with the connection info, then every other one kept that
        does not overlap it; those that do are dropped (:meth:`holds` says false for them).
        Transfers to the agent running at that moment may fail.

        Raises:
            SerializationError: NIXL could not load it.
        """
        new = _Loaded(memory.kind, tuple(regions), metadata)
        with self._lock:
            peer = self._peers.get(agent)
            if peer is None:
                self._load(agent, metadata.with_connection)
                self._peers[agent] = _Peer({key: new}, [])
                return
            loaded = [*peer.live.values(), *peer.released]
            if any(old.metadata == metadata for old in loaded):  # the same registration again
                peer.live[key] = new
                return
            if not any(new.overlaps(old) for old in loaded):
                self._load(agent, metadata.memory)
                peer.live[key] = new
                return
            self._agent.remove_remote_agent(agent)
            del self._peers[agent]  # should a load fail, the next import starts afresh
            self._load(agent, metadata.with_connection)
            again = self._peers[agent] = _Peer({key: new}, [])
            for other, old in peer.live.items():
                if not new.overlaps(old):
                    self._load(agent, old.metadata.memory)
                    again.live[other] = old

    def _load(self, agent: str, metadata: bytes) -> None:
        try:
            self._agent.add_remote_agent(metadata)
        except Exception as exc:  # NIXL raises its own error classes
            raise SerializationError(
                f"NIXL could not load the metadata of agent {agent!r}: {exc!r}"
            ) from exc

    def holds(self, agent: str, key: object) -> bool:
        """Whether the registration kept under ``key`` is still loaded (see :meth:`connect`)."""
        with self._lock:
            peer = self._peers.get(agent)
            return peer is not None and key in peer.live

    def forget(self, agent: str, key: object) -> None:
        """Stop keeping the registration under ``key`` (its import was released); NIXL still
        holds its regions until the next reconnection."""
        with self._lock:
            peer = self._peers.get(agent)
            loaded = peer.live.pop(key, None) if peer is not None else None
            if loaded is not None:
                peer.released.append(loaded)

    def transfer(
        self,
        op: NixlOp,
        local: list[Descriptor],
        local_kind: MemKind,
        remote: list[Descriptor],
        target: RemoteMemory,
        notification: bytes | None = None,
    ) -> None:
        """Move ``local`` regions to or from ``remote`` regions of ``target``; returns when the
        bytes have moved.

        Args:
            notification: delivered to the remote agent once the bytes have moved.

        Raises:
            TransferError: NIXL refused the transfer or reported it failed.
        """
        with self._lock:
            try:
                handle = self._agent.initialize_xfer(
                    op.value,
                    self._agent.get_xfer_descs(local, local_kind.value),
                    self._agent.get_xfer_descs(remote, target.kind.value),
                    target.agent,
                    notification or b"",
                )
                state = self._agent.transfer(handle)
            except Exception as exc:  # NIXL raises its own error classes
                raise TransferError(f"NIXL {op.value} to {target.agent!r}: {exc!r}") from exc
        try:
            pauses = _pauses()
            while state == "PROC":
                time.sleep(next(pauses))
                with self._lock:
                    state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise TransferError(f"NIXL {op.value} to {target.agent!r} failed ({state})")
        finally:
            with self._lock:
                self._agent.release_xfer_handle(handle)

    def notifications(self) -> dict[str, list[bytes]]:
        """Messages that arrived from other agents and were not yet returned (by this call or
        :meth:`wait_for`), by agent name, oldest first."""
        with self._lock:
            self._collect()
            inbox, self._inbox = self._inbox, {}
        return inbox

    def wait_for(self, agent: str, message: bytes, timeout: float | None = None) -> None:
        """Wait until ``message`` from ``agent`` arrives, and take it out of the messages
        :meth:`notifications` returns (others stay there).

        Raises:
            TimeoutError: it did not arrive within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pauses = _pauses()
        while True:
            with self._lock:
                self._collect()
                waiting = self._inbox.get(agent, [])
                if message in waiting:
                    waiting.remove(message)
                    return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no message {message!r} from agent {agent!r} in {timeout} s")
            time.sleep(next(pauses))

    def _collect(self) -> None:
        """Move newly arrived messages into the inbox (the lock held)."""
        for name, messages in self._agent.get_new_notifs().items():
            key = name.decode() if isinstance(name, bytes) else name
            self._inbox.setdefault(key, []).extend(bytes(m) for m in messages)
