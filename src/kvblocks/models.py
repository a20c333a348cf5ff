"""KV cache dims of well-known models, so users can name a model instead of its sizes.

Only what shapes the KV cache is recorded: layers, KV heads (after grouped-query attention),
head dim, and the outer dim (2 for K and V; 1 for a multi-head latent attention cache, whose
single "head" is the compressed latent plus its rotary part).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvblocks.errors import InvalidArgumentError
from kvblocks.layout import KvDims


@dataclass(frozen=True)
class ModelSpec:
    """The KV-cache-shaping sizes of one model."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    outer_dim: int = 2

    def dims(self, tokens_per_block: int, dtype: torch.dtype | str = "bf16", tp: int = 1) -> KvDims:
        """The block dims of this model on one of ``tp`` tensor-parallel ranks.

        Raises:
            InvalidArgumentError: ``tp`` does not divide the KV heads.
        """
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1 or self.num_kv_heads % tp:
            raise InvalidArgumentError(
                "tp", f"must divide {self.name}'s {self.num_kv_heads} KV heads, got {tp!r}"
            )
        return KvDims(
            nl=self.num_layers,
            no=self.outer_dim,
            nh=self.num_kv_heads // tp,
            nt=tokens_per_block,
            hd=self.head_dim,
            dtype=dtype,
        )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("llama-3.2-1b", 16, 8, 64),
        ModelSpec("llama-3.2-3b", 28, 8, 128),
        ModelSpec("llama-3.1-8b", 32, 8, 128),
        ModelSpec("llama-3.1-70b", 80, 8, 128),
        ModelSpec("llama-3.1-405b", 126, 8, 128),
        ModelSpec("mistral-7b", 32, 8, 128),
        ModelSpec("mixtral-8x7b", 32, 8, 128),
        ModelSpec("qwen2.5-7b", 28, 4, 128),
        ModelSpec("qwen2.5-72b", 80, 8, 128),
        ModelSpec("qwen3-8b", 36, 8, 128),
        ModelSpec("gemma-2-9b", 42, 8, 256),
        ModelSpec("deepseek-v3", 61, 1, 576, outer_dim=1),
    )
}


def lookup_model(name: str) -> ModelSpec:
    """The spec of a model by name (case-insensitive).

    Raises:
        InvalidArgumentError: the name is not in :data:`MODELS`; the message lists them.
    """
    key = name.strip().lower()
    if key not in MODELS:
        raise InvalidArgumentError("model", f"must be one of {', '.join(MODELS)}, got {name!r}")
    return MODELS[key]
