"""SerializedLayout: a layout's description as bytes, for another worker.

Wire form: the 4 bytes ``KVBL``, then UTF-8 JSON with a ``version`` field. Readers refuse any
other version with a :class:`SerializationError` that names both versions, so two workers of
different releases fail clearly rather than misread each other's layouts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kvblocks.errors import SerializationError
from kvblocks.layout import (
    BlockDim,
    BlockDimension,
    KvBlockLayout,
    LayoutConfig,
    MemoryRegion,
)
from kvblocks.storage import PhysicalLayout, StorageKind
from kvblocks.transfer.handles import WorkerAddress

MAGIC = b"KVBL"
VERSION = 1


@dataclass(frozen=True)
class SerializedLayout:
    """What another worker needs to address a layout: who holds it, its storage, sizes, format
    and the regions (addresses or file offsets) of its allocations."""

    worker: WorkerAddress
    storage: StorageKind
    config: LayoutConfig
    fully_contiguous: bool
    block_dim: BlockDimension | None
    kv_format: KvBlockLayout
    regions: tuple[MemoryRegion, ...]
    version: int = VERSION

    @classmethod
    def of(cls, physical: PhysicalLayout, worker: WorkerAddress) -> SerializedLayout:
        layout = physical.layout
        return cls(
            worker=worker,
            storage=physical.storage,
            config=physical.config,
            fully_contiguous=layout.is_fully_contiguous,
            block_dim=getattr(layout, "block_dim", None),
            kv_format=physical.kv_format,
            regions=layout.memory,
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
            "layout": "fully_contiguous" if self.fully_contiguous else "layer_separate",
            "block_dim": self.block_dim.value if self.block_dim else None,
            "kv_format": {
                "name": self.kv_format.name,
                "order": [d.value for d in self.kv_format.dim_order]
                if self.kv_format.dim_order
                else None,
            },
            "regions": [[r.addr, r.size] for r in self.regions],
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
                fully_contiguous=body["layout"] == "fully_contiguous",
                block_dim=BlockDimension(body["block_dim"]) if body["block_dim"] else None,
                kv_format=kv_format,
                regions=tuple(MemoryRegion(a, s) for a, s in body["regions"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SerializationError(f"the serialized layout is damaged: {exc!r}") from None
