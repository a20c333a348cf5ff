"""SerializedLayout: a layout's description as bytes, for another worker.

Wire form: the 4 bytes ``KVBL``, then UTF-8 JSON with a ``version`` field. Readers refuse any
other version with a :class:`SerializationError` that names both versions, so two workers of
different releases fail clearly rather than misread each other's layouts.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from kvblocks.errors import SerializationError
from kvblocks.layout import (
    BlockDim,
    BlockDimension,
    KvBlockLayout,
    LayoutConfig,
    LayoutKind,
    MemoryRegion,
)
from kvblocks.remote import MemKind, NixlMetadata, memory_of
from kvblocks.storage import PhysicalLayout, StorageKind
from kvblocks.transfer.handles import LogicalLayoutHandle, WorkerAddress

MAGIC = b"KVBL"
VERSION = 2


@dataclass(frozen=True)
class SerializedLayout:
    """What another worker needs to address a layout: who holds it, its storage, sizes,
    format, the regions (addresses or file offsets) of its allocations, the GPU of GPU memory
    (``None`` for host memory, also for device layouts of a worker without a GPU), and the NIXL
    metadata that lets the other worker's agent reach this one (``None`` where this worker has
    no NIXL agent), and the tier the layout serves (``None`` if none was given)."""

    worker: WorkerAddress
    storage: StorageKind
    config: LayoutConfig
    kind: LayoutKind
    block_dim: BlockDimension | None
    kv_format: KvBlockLayout
    regions: tuple[MemoryRegion, ...]
    device_id: int | None = None
    nixl_metadata: NixlMetadata | None = None
    tier: LogicalLayoutHandle | None = None
    version: int = VERSION

    @classmethod
    def of(
        cls,
        physical: PhysicalLayout,
        worker: WorkerAddress,
        nixl_metadata: NixlMetadata | None = None,
        tier: LogicalLayoutHandle | None = None,
    ) -> SerializedLayout:
        layout = physical.layout
        kind, index = memory_of(physical.device)
        return cls(
            worker=worker,
            storage=physical.storage,
            config=physical.config,
            kind=layout.kind,
            block_dim=getattr(layout, "block_dim", None),
            kv_format=physical.kv_format,
            regions=layout.memory,
            device_id=index if kind is MemKind.VRAM else None,
            nixl_metadata=nixl_metadata,
            tier=tier,
        )

    def to_bytes(self) -> bytes:
        cfg = self.config
        body = {
            "version": self.version,
            "worker": {"id": self.worker.worker_id, "agent": self.worker.agent_name},
            "storage": self.storage.value,
            "config": {
                "num_blocks": cfg.num_blocks,
                "num_layers": cfg.num_layers,
                "outer_dim": cfg.outer_dim,
                "page_size": cfg.page_size,
                "inner_dim": cfg.inner_dim,
                "dtype_width_bytes": cfg.dtype_width_bytes,
                "num_heads": cfg.num_heads,
            },
            "layout": self.kind.value,
            "block_dim": self.block_dim.value if self.block_dim else None,
            "kv_format": {
                "name": self.kv_format.name,
                "order": [d.value for d in self.kv_format.dim_order]
                if self.kv_format.dim_order
                else None,
            },
            "regions": [[r.addr, r.size] for r in self.regions],
            "device_id": self.device_id,
            "nixl_metadata": _encode_nixl(self.nixl_metadata),
            "tier": self.tier.value if self.tier is not None else None,
        }
        return MAGIC + json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SerializedLayout:
        """Read a layout description.

        Raises:
            SerializationError: not a serialized layout, another version, or damaged.
        """
        if not isinstance(data, (bytes, bytearray)) or not data.startswith(MAGIC):
            raise SerializationError("not a serialized kvblocks layout (no KVBL header)")
        try:
            body = json.loads(bytes(data[len(MAGIC) :]).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SerializationError(f"the serialized layout is damaged: {exc}") from None
        version = body.get("version") if isinstance(body, dict) else None
        if version != VERSION:
            raise SerializationError(
                f"the serialized layout is version {version!r}; this kvblocks reads version "
                f"{VERSION} (upgrade the older worker)"
            )
        try:
            fmt = body["kv_format"]
            if fmt["name"] == "custom":
                kv_format = KvBlockLayout.Custom([BlockDim(d) for d in fmt["order"]])
            else:
                kv_format = KvBlockLayout.from_name(fmt["name"])
            return cls(
                worker=WorkerAddress(body["worker"]["id"], body["worker"]["agent"]),
                storage=StorageKind(body["storage"]),
                config=LayoutConfig(**body["config"]),
                kind=LayoutKind(body["layout"]),
                block_dim=BlockDimension(body["block_dim"]) if body["block_dim"] else None,
                kv_format=kv_format,
                regions=tuple(MemoryRegion(a, s) for a, s in body["regions"]),
                device_id=body["device_id"],
                nixl_metadata=_decode_nixl(body["nixl_metadata"]),
                tier=LogicalLayoutHandle(body["tier"]) if body["tier"] is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SerializationError(f"the serialized layout is damaged: {exc!r}") from None


def _encode_nixl(metadata: NixlMetadata | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    return {
        "with_connection": base64.b64encode(metadata.with_connection).decode(),
        "memory": base64.b64encode(metadata.memory).decode(),
    }


def _decode_nixl(body: dict[str, str] | None) -> NixlMetadata | None:
    if body is None:
        return None
    return NixlMetadata(
        base64.b64decode(body["with_connection"], validate=True),
        base64.b64decode(body["memory"], validate=True),
    )
