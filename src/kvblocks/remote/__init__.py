"""Other workers' memory, reached through NIXL: :class:`NixlAgent` registers this worker's
memory, loads other workers' metadata and READs or WRITEs their blocks.

The :class:`~kvblocks.transfer.TransferManager` drives it: build the manager with
``.nixl_backend("UCX")``, exchange :class:`~kvblocks.transfer.SerializedLayout` s, and transfers
between a local and an imported layout go through the agent.
"""

from kvblocks.remote.nixl import (
    MemKind,
    NixlAgent,
    NixlMetadata,
    NixlOp,
    RemoteMemory,
    installed_package,
    load_api,
    memory_of,
    nixl_available,
)

__all__ = [
    "MemKind",
    "NixlAgent",
    "NixlMetadata",
    "NixlOp",
    "RemoteMemory",
    "installed_package",
    "load_api",
    "memory_of",
    "nixl_available",
]
