"""Peers: what a TransferManager's NIXL agent knows, on both sides of a remote transfer.

- this worker's memory layouts, registered with NIXL as the manager registers them, and the
  NIXL metadata their exports carry;
- the layouts imported from other workers: where each one's memory is (:class:`RemoteMemory`)
  and whether NIXL still holds its registration.
"""

from __future__ import annotations

import threading

from kvblocks.errors import BackendUnavailableError, LayoutReleasedError
from kvblocks.remote import MemKind, NixlAgent, NixlMetadata, RemoteMemory, memory_of
from kvblocks.storage import PhysicalLayout, StorageKind
from kvblocks.transfer.handles import LayoutHandle
from kvblocks.transfer.serialize import SerializedLayout


class Peers:
    """The NIXL side of one TransferManager (see the module documentation)."""

    def __init__(self, agent: NixlAgent) -> None:
        self.agent = agent
        self._lock = threading.Lock()
        self._registrations: dict[LayoutHandle, object] = {}
        self._imports: dict[PhysicalLayout, RemoteMemory] = {}

    def register(self, handle: LayoutHandle, physical: PhysicalLayout) -> None:
        """Register a local memory layout's allocations with NIXL (files are not offered)."""
        if physical.storage in (StorageKind.DISK, StorageKind.REMOTE):
            return
        kind, device_id = memory_of(physical.device)
        registration = self.agent.register(physical.layout.memory, kind, device_id)
        with self._lock:
            self._registrations[handle] = registration

    def metadata(self, handle: LayoutHandle) -> NixlMetadata | None:
        """What another worker loads to reach this layout; ``None`` for a file."""
        registration = self._registrations.get(handle)
        return self.agent.metadata(registration) if registration is not None else None

    def add_import(self, physical: PhysicalLayout, serialized: SerializedLayout) -> None:
        """Load the NIXL metadata of another worker's layout, imported as ``physical``.

        Raises:
            SerializationError: NIXL could not load it.
        """
        if serialized.nixl_metadata is None:
            return
        gpu = serialized.device_id
        kind = MemKind.DRAM if gpu is None else MemKind.VRAM
        target = RemoteMemory(serialized.worker.agent_name, kind, gpu or 0)
        self.agent.connect(
            target.agent, physical, target, serialized.regions, serialized.nixl_metadata
        )
        with self._lock:
            self._imports[physical] = target

    def release(self, handle: LayoutHandle, physical: PhysicalLayout) -> None:
        """Deregister a local layout, or forget an imported one."""
        with self._lock:
            registration = self._registrations.pop(handle, None)
            target = self._imports.pop(physical, None)
        if registration is not None:
            self.agent.deregister(registration)
        if target is not None:
            self.agent.forget(target.agent, physical)

    def target(self, physical: PhysicalLayout, argument: str) -> RemoteMemory:
        """Where an imported layout's memory is, checked usable.

        Raises:
            BackendUnavailableError: it was imported without NIXL metadata.
            LayoutReleasedError: its worker registered other memory over it since.
        """
        target = self._imports.get(physical)
        if target is None:
            raise BackendUnavailableError(
                f"{argument} was imported without NIXL metadata (its worker has no NIXL agent"
                " or this manager had none): export and import it again"
            )
        if not self.agent.holds(target.agent, physical):
            raise LayoutReleasedError(
                f"{argument}: its worker registered other memory over this layout since it was"
                " imported; export and import it again"
            )
        return target
