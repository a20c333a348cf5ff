"""BlockManagerConfig: the sizes of a block and of each tier.

The host (G2) and disk (G3) tiers are sized in GiB; their defaults come from the environment::

    KVBLOCKS_CPU_CACHE_GB    pinned host memory for G2 (default 0: no G2)
    KVBLOCKS_DISK_CACHE_GB   disk space for G3, in ``offload_path`` (default 0: no G3)

An argument given to :meth:`BlockManagerConfig.from_env` wins over the environment.

G1 lives in the engine's own cache tensors, shaped as its attention kernels want them
(:class:`DeviceLayout`; ``inner`` is ``[nt, nh, hd]`` for ``device_format`` NHD and
``[nh, nt, hd]`` for HND)::

    BLOCK_FIRST       nl tensors      [num_blocks, no, *inner]
    OUTER_FIRST       nl tensors      [no, num_blocks, *inner]
    OUTER_SEPARATE    nl * no tensors [num_blocks, *inner]   (layer 0's K, layer 0's V, ...)
    FULLY_CONTIGUOUS  1 tensor        [num_blocks, nl, no, *inner]
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from enum import Enum
from typing import Literal

import torch

from kvblocks.checks import positive_int
from kvblocks.errors import InvalidArgumentError
from kvblocks.layout import (
    BlockDimension,
    KvBlockLayout,
    KvDims,
    LayoutConfig,
    LayoutKind,
    dtype_name,
)
from kvblocks.layout.dtypes import parse_dtype

#: Environment variable for the G2 size in GiB.
CPU_CACHE_ENV = "KVBLOCKS_CPU_CACHE_GB"
#: Environment variable for the G3 size in GiB.
DISK_CACHE_ENV = "KVBLOCKS_DISK_CACHE_GB"
#: ``host_numa_node`` for the NUMA node of the GPU.
GPU_NODE = "gpu"


class DeviceLayout(Enum):
    """How the tensors of G1 (the engine's paged KV cache) are shaped; ``inner`` is one
    ``(layer, outer)`` region of a block: ``[nt, nh, hd]`` (NHD) or ``[nh, nt, hd]`` (HND)."""

    BLOCK_FIRST = "block_first"
    """One tensor per layer, ``[num_blocks, no, *inner]`` (vLLM's FlashInfer and Triton
    attention backends)."""
    OUTER_FIRST = "outer_first"
    """One tensor per layer, ``[no, num_blocks, *inner]``: every block's K, then every block's V
    (vLLM's FlashAttention backend)."""
    OUTER_SEPARATE = "outer_separate"
    """One tensor per layer and outer chunk, ``[num_blocks, *inner]``, in the order layer 0's K,
    layer 0's V, layer 1's K, ... (SGLang's K and V buffers from their second page on, the
    first taking padded tokens' writes, viewed as pages)."""
    FULLY_CONTIGUOUS = "fully_contiguous"
    """One tensor for all layers, ``[num_blocks, nl, no, *inner]`` (a block pool such as
    TensorRT-LLM's)."""

    @property
    def block_axis(self) -> int:
        """The axis of the block index in each tensor."""
        return 1 if self is DeviceLayout.OUTER_FIRST else 0

    @property
    def layout_kind(self) -> LayoutKind:
        """The kind of :class:`~kvblocks.layout.Layout` that addresses these tensors."""
        if self is DeviceLayout.FULLY_CONTIGUOUS:
            return LayoutKind.FULLY_CONTIGUOUS
        if self is DeviceLayout.OUTER_SEPARATE:
            return LayoutKind.OUTER_SEPARATE
        return LayoutKind.LAYER_SEPARATE

    @property
    def block_dim(self) -> BlockDimension:
        """Where the block index sits in a layer's tensor (for the layer-separate kinds)."""
        if self is DeviceLayout.OUTER_FIRST:
            return BlockDimension.OUTER_FIRST
        return BlockDimension.BLOCK_FIRST


@dataclass(frozen=True)
class BlockManagerConfig:
    """What a :class:`~kvblocks.pool.BlockManager` manages.

    Attributes:
        num_layers: model layers (``nl``).
        num_kv_heads: KV heads on this worker (``nh``).
        head_dim: elements per head (``hd``).
        block_size: tokens per block (``nt``).
        outer_dim: 2 for separate K and V, 1 for a latent cache (``no``).
        dtype: element type of the cache (``"bf16"``, ``torch.float16``, ...).
        device_blocks: G1 blocks; ``None`` takes ``gpu_memory_fraction`` of the GPU's free
            memory (it must be given on a machine without a GPU).
        gpu_memory_fraction: share of free GPU memory G1 takes when ``device_blocks`` is None.
        enable_offload: offload registered blocks to G2 and G3 and onboard them back on a
            prefix hit; without it only G1 exists.
        host_cache_gb: G2 size in GiB (pinned host memory).
        host_numa_node: the NUMA node G2's pages are placed on: ``"gpu"`` (the default) the
            node of GPU ``device_id`` where the system has more than one node and says which
            (else, as with None, wherever the system puts them); a node number; or None,
            wherever the system puts them (the node of the CPU that first touches each page).
            See :mod:`~kvblocks.storage.numa`.
        disk_cache_gb: G3 size in GiB (a file in ``offload_path``); needs a G2 to stage through.
        offload_path: directory of the G3 file and its journal. One BlockManager at a time
            uses a G3 file (it is locked while open): workers on one machine that hold blocks
            of the same shape (tensor-parallel ranks, say) need a directory or a
            ``disk_cache_key`` each.
        disk_cache_key: whose blocks G3 holds, kept with the file across restarts: the model
            and its revision, and the heads this worker holds (``"llama-3.1-70b/tp3of8"``,
            say). A G3 file written under another key (or none) is not reused. With None a
            file is known by the block shape alone, so blocks of another model of that shape,
            or of another tensor-parallel rank, written to the same directory earlier would be
            taken for this worker's.
        device_id: the GPU of G1.
        device_format: the order inside a G1 block (an operational format: engines compute in it).
        device_layout: how G1's tensors are shaped (:class:`DeviceLayout`).
        storage_format: the order inside G2 and G3 blocks (``UniversalTP`` by default, so a
            stored block can be served to any tensor-parallel split).
        sliding_window: for a manager of sliding-window layers only (one group of a hybrid
            model's layers, say): the tokens each token attends to, itself included. A lookup
            then hits a prefix when the blocks of its last ``sliding_window - 1`` tokens are
            cached, and only those are held and onboarded (:mod:`~kvblocks.pool.window`).
            None: full attention, every block of the prefix is needed.
        onboard_layer_groups: how many groups of layers a ``lookup(..., wait=False)`` copies
            into G1 one after another, each with its own completion that the engine's stream
            can wait for (``PrefixHit.ready.wait_layer``): more groups let the forward pass
            start sooner, each costs the host one more copy per run of neighbouring G2 blocks
            (``num_layers`` groups at most are made). 4 overlapped the copies of a 2 GiB hit
            with the forward pass best on an H100 (docs/performance.md).
        nixl_backend: the NIXL backend plugin (``"UCX"``, ...) of the manager's own
            TransferManager, needed to share G2 blocks with other workers (tier G4); None
            for no NIXL agent.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 64
    outer_dim: int = 2
    dtype: torch.dtype | str = "bf16"
    device_blocks: int | None = None
    gpu_memory_fraction: float = 0.9
    enable_offload: bool = False
    host_cache_gb: float = 0.0
    host_numa_node: int | Literal["gpu"] | None = GPU_NODE
    disk_cache_gb: float = 0.0
    offload_path: str = "/tmp"
    disk_cache_key: str | None = None
    device_id: int = 0
    device_format: KvBlockLayout = KvBlockLayout.OperationalNHD
    device_layout: DeviceLayout = DeviceLayout.BLOCK_FIRST
    storage_format: KvBlockLayout = KvBlockLayout.UniversalTP
    sliding_window: int | None = None
    onboard_layer_groups: int = 1
    nixl_backend: str | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "outer_dim"):
            positive_int(getattr(self, name), name)
        if self.device_blocks is not None:
            positive_int(self.device_blocks, "device_blocks")
        if isinstance(self.device_id, bool) or not isinstance(self.device_id, int):
            raise InvalidArgumentError("device_id", f"must be an int, got {self.device_id!r}")
        if self.device_id < 0:
            raise InvalidArgumentError("device_id", f"must be >= 0, got {self.device_id}")
        object.__setattr__(self, "dtype", parse_dtype(self.dtype, "dtype"))
        fraction = self.gpu_memory_fraction
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise InvalidArgumentError(
                "gpu_memory_fraction", f"must be in (0, 1], got {fraction!r}"
            )
        for name in ("host_cache_gb", "disk_cache_gb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidArgumentError(name, f"must be a number of GiB, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise InvalidArgumentError(name, f"must be finite and >= 0, got {value!r}")
        if not isinstance(self.enable_offload, bool):
            raise InvalidArgumentError(
                "enable_offload", f"must be True or False, got {self.enable_offload!r}"
            )
        if not self.device_format.is_operational():
            raise InvalidArgumentError(
                "device_format",
                f"must be OperationalNHD or OperationalHND, got {self.device_format.name}",
            )
        if not isinstance(self.device_layout, DeviceLayout):
            raise InvalidArgumentError(
                "device_layout",
                f"must be a DeviceLayout ({', '.join(d.name for d in DeviceLayout)}),"
                f" got {self.device_layout!r}",
            )
        if self.storage_format.dim_order is None:
            raise InvalidArgumentError(
                "storage_format", f"must be a known format, got {self.storage_format.name}"
            )
        window = self.sliding_window
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 2
        ):
            raise InvalidArgumentError(
                "sliding_window",
                f"must be None or an int >= 2 (tokens each token attends to, itself included),"
                f" got {window!r}",
            )
        positive_int(self.onboard_layer_groups, "onboard_layer_groups")
        node = self.host_numa_node
        if node not in (None, GPU_NODE) and (
            isinstance(node, bool) or not isinstance(node, int) or node < 0
        ):
            raise InvalidArgumentError(
                "host_numa_node",
                f"must be {GPU_NODE!r}, a NUMA node number or None, got {node!r}",
            )
        if self.disk_cache_key is not None and (
            not isinstance(self.disk_cache_key, str) or not self.disk_cache_key.strip()
        ):
            raise InvalidArgumentError(
                "disk_cache_key", f"must be a non-empty str or None, got {self.disk_cache_key!r}"
            )
        if self.nixl_backend is not None and (
            not isinstance(self.nixl_backend, str) or not self.nixl_backend
        ):
            raise InvalidArgumentError(
                "nixl_backend", f"must be a NIXL plugin name or None, got {self.nixl_backend!r}"
            )
        if self.enable_offload:
            if self.host_blocks == 0:
                raise InvalidArgumentError(
                    "host_cache_gb",
                    f"must hold at least one block ({self.block_bytes} bytes) when"
                    f" enable_offload is set (got {self.host_cache_gb} GiB; or set"
                    f" {CPU_CACHE_ENV})",
                )
            if self.disk_cache_gb and self.disk_blocks == 0:
                raise InvalidArgumentError(
                    "disk_cache_gb",
                    f"must hold at least one block ({self.block_bytes} bytes) or be 0,"
                    f" got {self.disk_cache_gb} GiB",
                )
            if self.disk_blocks and not os.path.isdir(self.offload_path):
                raise InvalidArgumentError(
                    "offload_path", f"must be an existing directory, got {self.offload_path!r}"
                )

    @classmethod
    def from_dims(cls, dims: KvDims, **kwargs) -> BlockManagerConfig:
        """A config for blocks of ``dims`` (layers, K/V, tokens, heads, head dim, dtype), the
        other fields from ``kwargs``."""
        return cls(
            num_layers=dims.nl,
            num_kv_heads=dims.nh,
            head_dim=dims.hd,
            outer_dim=dims.no,
            block_size=dims.nt,
            dtype=dims.dtype,
            **kwargs,
        )

    @classmethod
    def from_env(cls, **kwargs) -> BlockManagerConfig:
        """A config whose ``host_cache_gb`` and ``disk_cache_gb`` default to the environment
        (:data:`CPU_CACHE_ENV`, :data:`DISK_CACHE_ENV`); offload is enabled when either is
        set and ``enable_offload`` is not given.

        Raises:
            InvalidArgumentError: an unknown field, or an environment value that is not a
                non-negative number (the message names the variable).
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidArgumentError(
                unknown[0], f"is not a config field; fields: {sorted(known)}"
            )
        for name, env in (("host_cache_gb", CPU_CACHE_ENV), ("disk_cache_gb", DISK_CACHE_ENV)):
            if name not in kwargs and os.environ.get(env, "").strip():
                kwargs[name] = _env_gb(env)
        if "enable_offload" not in kwargs:
            kwargs["enable_offload"] = bool(kwargs.get("host_cache_gb") or 0)
        return cls(**kwargs)

    def dims(self) -> KvDims:
        """The block dims: ``[nl, no, nt, nh, hd]`` elements of :attr:`dtype`."""
        return KvDims(
            nl=self.num_layers,
            no=self.outer_dim,
            nh=self.num_kv_heads,
            nt=self.block_size,
            hd=self.head_dim,
            dtype=self.dtype,
        )

    @property
    def block_bytes(self) -> int:
        """Bytes of one block (all layers, K and V)."""
        return self.dims().block_bytes

    def device_tensor_shapes(self, num_blocks: int) -> list[tuple[int, ...]]:
        """The shape of each G1 tensor for ``num_blocks`` blocks, in order (one per layer, one
        per layer and outer chunk, or one in all; see :class:`DeviceLayout`)."""
        dims = self.dims()
        inner = dims.region_shape(self.device_format.inner_order)
        if self.device_layout is DeviceLayout.FULLY_CONTIGUOUS:
            return [(num_blocks, dims.nl, dims.no, *inner)]
        if self.device_layout is DeviceLayout.OUTER_SEPARATE:
            return [(num_blocks, *inner)] * (dims.nl * dims.no)
        if self.device_layout is DeviceLayout.OUTER_FIRST:
            return [(dims.no, num_blocks, *inner)] * dims.nl
        return [(num_blocks, dims.no, *inner)] * dims.nl

    def layout_config(self, num_blocks: int) -> LayoutConfig:
        return LayoutConfig.from_dims(self.dims(), num_blocks)

    @property
    def host_blocks(self) -> int:
        """G2 blocks that ``host_cache_gb`` holds."""
        return int(self.host_cache_gb * 2**30) // self.block_bytes

    @property
    def disk_blocks(self) -> int:
        """G3 blocks that ``disk_cache_gb`` holds (0 without offload)."""
        if not self.enable_offload:
            return 0
        return int(self.disk_cache_gb * 2**30) // self.block_bytes

    def describe(self) -> str:
        """One line: the block shape and size."""
        return (
            f"{self.num_layers} layers x {self.outer_dim} x {self.block_size} tokens x"
            f" {self.num_kv_heads} heads x {self.head_dim} {dtype_name(self.dtype)}"
            f" = {self.block_bytes} bytes per block"
        )


def _env_gb(env: str) -> float:
    text = os.environ[env]
    try:
        value = float(text)
    except ValueError:
        raise InvalidArgumentError(env, f"must be a number of GiB, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(env, f"must be finite and >= 0, got {text!r}")
    return value
