"""A small inference engine whose attention reads its KV cache from a BlockManager.

The model is a decoder-only transformer with random weights, shaped as Llama's (grouped-query
attention, rotary positions, RMSNorm, a SwiGLU MLP): what it says is noise, but every number it
computes is real. Its paged KV cache is the manager's G1, and each request runs as an engine
runs it:

1. ``lookup(prompt, wait=False)``: the prompt's cached prefix is held in G1; blocks found in
   G2 or G3 are copied back while the engine goes on.
2. ``allocate`` the blocks for the rest of the prompt and the tokens to generate.
3. Prefill only the tokens after the prefix, layer by layer, each layer after
   ``hit.ready.wait_layer(layer)``; then decode greedily, one token at a time. Each step
   writes its K and V into the cache through the block table and attends over the cache.
4. ``register`` the blocks filled, ``free`` the request's blocks: they stay cached, and the
   manager offloads them to G2 and G3 in the background.

The workload is a chat: conversations share a few system prompts and each turn resends the
whole history, the model's earlier answers included. G1 holds a fraction of it, so prefixes
come back from every tier. Every request's logits are checked against a forward pass of the
same tokens without any cache; the run fails if one differs by more than ``--tolerance``.

Run: ``python examples/tiny_engine.py`` (on the GPU where there is one; ``--help`` for sizes).

Shapes: ``T`` tokens of a request step, ``H`` query heads, ``nh`` KV heads, ``hd`` head dim,
``d = H * hd`` the model width, ``V`` the vocabulary.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace

import torch
from torch.nn.attention.bias import causal_lower_right

from kvblocks.errors import KvBlocksError
from kvblocks.layout import KvBlockLayout
from kvblocks.pool import BlockManager, BlockManagerConfig, DeviceLayout, PrefixHit, Tier


@dataclass(frozen=True)
class ModelDims:
    """Sizes of the model (a small one by default) and the dtype of its weights and KV."""

    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 16
    vocab: int = 512
    mlp_width: int = 256
    dtype: torch.dtype = torch.float32

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim


class Transformer:
    """A decoder with random weights, shaped as Llama's: RMSNorm, grouped-query attention with
    rotary positions, a SwiGLU MLP. ``forward`` runs any span of a sequence given a way to
    store and read K and V; ``reference_logits`` runs a whole sequence with no cache at all."""

    def __init__(self, dims: ModelDims, device: torch.device, seed: int) -> None:
        self.dims = dims
        gen = torch.Generator(device).manual_seed(seed)
        d, kv = dims.width, dims.num_kv_heads * dims.head_dim

        def weight(rows: int, cols: int, scale: float) -> torch.Tensor:
            w = torch.randn(rows, cols, generator=gen, device=device, dtype=dims.dtype)
            return w.mul_(scale)

        self.embed = weight(dims.vocab, d, 1.0)
        self.layers = [
            {
                "wq": weight(d, d, d**-0.5),
                "wk": weight(d, kv, d**-0.5),
                "wv": weight(d, kv, d**-0.5),
                "wo": weight(d, d, d**-0.5),
                "gate": weight(d, dims.mlp_width, d**-0.5),
                "up": weight(d, dims.mlp_width, d**-0.5),
                "down": weight(dims.mlp_width, d, dims.mlp_width**-0.5),
            }
            for _ in range(dims.num_layers)
        ]
        self.unembed = weight(d, dims.vocab, d**-0.5)

    def forward(self, tokens: torch.Tensor, start: int, kv_store) -> torch.Tensor:
        """Logits ``[T, V]`` of ``tokens`` (``[T]``) at positions ``start .. start + T - 1``.

        ``kv_store(layer, k, v)`` takes the span's rotated keys and values (``[T, nh, hd]``
        each), keeps them, and returns the keys and values of positions ``0 .. start + T - 1``
        (``[start + T, nh, hd]`` each) for the span to attend to.
        """
        dims = self.dims
        positions = torch.arange(start, start + len(tokens), device=tokens.device)
        rotation = _rotation(positions, dims.head_dim, dims.dtype)
        x = self.embed[tokens]
        for layer, w in enumerate(self.layers):
            h = _rms_norm(x)
            q = _rotate((h @ w["wq"]).view(-1, dims.num_heads, dims.head_dim), rotation)
            k = _rotate((h @ w["wk"]).view(-1, dims.num_kv_heads, dims.head_dim), rotation)
            v = (h @ w["wv"]).view(-1, dims.num_kv_heads, dims.head_dim)
            keys, values = kv_store(layer, k, v)
            x = x + _attention(q, keys, values) @ w["wo"]
            h = _rms_norm(x)
            x = x + (torch.nn.functional.silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"]
        return _rms_norm(x) @ self.unembed

    def reference_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[T, V]`` of the whole sequence ``tokens`` computed at once, no cache."""
        return self.forward(tokens, 0, lambda layer, k, v: (k, v))


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.rms_norm(x, x.shape[-1:], eps=1e-6)


def _rotation(
    positions: torch.Tensor, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines ``[T, 1, hd / 2]`` of the rotary angles at ``positions`` ``[T]``."""
    half = head_dim // 2
    freqs = 10000.0 ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions[:, None].float() * freqs
    return angles.cos()[:, None].to(dtype), angles.sin()[:, None].to(dtype)


def _rotate(x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``[T, heads, hd]`` (``rotation`` from
    :func:`_rotation`)."""
    cos, sin = rotation
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last ``T`` positions' queries ``[T, H, hd]`` over keys and
    values ``[S, nh, hd]`` of positions ``0 .. S - 1`` (query ``i`` is position
    ``S - T + i``); returns ``[T, H * hd]``."""
    mask = causal_lower_right(q.shape[0], k.shape[0])
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, heads, T or S, hd]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1).reshape(q.shape[2], -1)


class PagedKv:
    """The ``kv_store`` of one request: K and V go to the manager's G1 blocks of its block
    table, token ``p`` to block ``table[p // block_size]`` at row ``p % block_size``."""

    def __init__(self, manager: BlockManager, table: list[int], hit: PrefixHit) -> None:
        config = manager.config
        self.block_size = config.block_size
        self.table = torch.tensor(table, device=manager.device_tensors[0].device)
        # [num_blocks, nt, nh, hd] views of each layer's K and V, whatever the cache's layout;
        # region_view gives the page in the cache's own order, [nh, nt, hd] for HND.
        hnd = config.device_format is KvBlockLayout.OperationalHND

        def view(layer: int, outer: int) -> torch.Tensor:
            pages = manager.region_view(layer, outer)
            return pages.transpose(1, 2) if hnd else pages

        self.keys = [view(layer, 0) for layer in range(config.num_layers)]
        self.values = [view(layer, 1) for layer in range(config.num_layers)]
        self.ready = hit.ready
        self.ready_from = hit.num_tokens  # the first position the engine computes
        self.start = self.ready_from  # the first position of the step being computed
        # The slots of the step's positions, worked out at its first layer: where its K and V
        # go, and the slots of every position up to its last, which it attends to.
        self._span: tuple[int, int] | None = None
        self._write_to: tuple[torch.Tensor, torch.Tensor] | None = None
        self._read_from: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.start == self.ready_from:  # the first step: this layer of the prefix's blocks
            self.ready.wait_layer(layer)  # must be in place; later steps come after it
        end = self.start + k.shape[0]
        if self._span != (self.start, end):
            self._span = (self.start, end)
            self._write_to, self._read_from = self._slots(self.start, end), self._slots(0, end)
        self.keys[layer][self._write_to] = k
        self.values[layer][self._write_to] = v
        return self.keys[layer][self._read_from], self.values[layer][self._read_from]

    def _slots(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks and rows ``[end - start]`` each of positions ``start .. end - 1``."""
        positions = torch.arange(start, end, device=self.table.device)
        return self.table[positions // self.block_size], positions % self.block_size


@dataclass
class Generation:
    """One request's run: the prompt and answer ``tokens``, the logits ``[n, V]`` of the
    positions computed (from ``hit.num_tokens`` on, one per token whose KV was computed), the
    request's G1 ``block_ids`` (freed; cached as far as they were full), and the seconds from
    the call of :func:`generate` until its lookup returned (about 0 for a ``hit`` passed in)
    and until the first answer token was known on the host."""

    tokens: list[int]
    logits: torch.Tensor
    hit: PrefixHit
    block_ids: list[int]
    lookup_s: float
    first_token_s: float


def lookup_prefix(
    manager: BlockManager, prompt: list[int], onboard_from: Collection[Tier] | None = None
) -> PrefixHit:
    """The cached prefix of ``prompt`` that :func:`generate` reuses, its copies into G1 still
    on their way (``hit.ready``): every full block but the one of the last token, which is
    computed since its logits give the first answer token."""
    max_blocks = (len(prompt) - 1) // manager.config.block_size
    return manager.lookup(prompt, max_blocks=max_blocks, wait=False, onboard_from=onboard_from)


def generate(
    manager: BlockManager,
    model: Transformer,
    prompt: list[int],
    answer_tokens: int,
    onboard_from: Collection[Tier] | None = None,
    hit: PrefixHit | None = None,
) -> Generation:
    """Run one request as an engine does: reuse the prompt's cached prefix (copied into G1
    from the tiers of ``onboard_from``, None: all), compute the rest, generate
    ``answer_tokens`` tokens greedily, cache the blocks filled.

    A scheduler that looked the prefix up itself (``lookup_prefix``) passes its ``hit``,
    whose blocks this run then owns and frees; ``onboard_from`` is unused then."""
    size = manager.config.block_size
    device = manager.device_tensors[0].device
    start = time.perf_counter()
    if hit is None:
        hit = lookup_prefix(manager, prompt, onboard_from)
    lookup_s = time.perf_counter() - start
    kv_tokens = len(prompt) + answer_tokens - 1  # the last answer token's KV is not needed
    table = hit.block_ids + manager.allocate(-(-kv_tokens // size) - len(hit.block_ids))
    try:
        kv = PagedKv(manager, table, hit)
        tokens = list(prompt)
        step = prompt[hit.num_tokens :]
        logits = []
        while True:
            out = model.forward(torch.tensor(step, device=device), kv.start, kv)
            kv.start += len(step)
            logits.append(out)
            tokens.append(int(out[-1].argmax()))
            if len(logits) == 1:
                first_token_s = time.perf_counter() - start
            if len(tokens) == len(prompt) + answer_tokens:
                break
            step = tokens[-1:]
        full = kv_tokens // size
        done = len(hit.block_ids)
        manager.register(
            table[done:full], tokens[done * size : full * size], parent_hash=hit.last_hash
        )
    finally:
        manager.free(table)
    return Generation(tokens, torch.cat(logits), hit, table, lookup_s, first_token_s)


@dataclass
class RequestResult:
    """What serving one request did: tokens of the prompt taken from the cache (per tier)
    and computed, the answer, and how far its logits were from the no-cache forward pass."""

    prompt_tokens: int
    cached_tokens: int
    from_tier: dict[Tier, int]
    answer: list[int]
    max_logit_error: float


def serve(
    manager: BlockManager, model: Transformer, prompt: list[int], answer_tokens: int
) -> RequestResult:
    """:func:`generate`, then every logit checked against the forward pass of the same tokens
    without cache."""
    run = generate(manager, model, prompt, answer_tokens)
    cached = run.hit.num_tokens
    computed = torch.tensor(run.tokens[: cached + len(run.logits)], device=run.logits.device)
    error = float((run.logits - model.reference_logits(computed)[cached:]).abs().max())
    return RequestResult(len(prompt), cached, run.hit.from_tier, run.tokens[len(prompt) :], error)


@dataclass(frozen=True)
class Workload:
    """A seeded chat: ``conversations`` of ``turns`` each, interleaved turn by turn; each
    starts with one of ``system_prompts`` shared prompts, each turn adds ``user_tokens``."""

    conversations: int = 6
    turns: int = 4
    system_prompts: int = 2
    system_tokens: int = 64
    user_tokens: int = 24
    answer_tokens: int = 12
    seed: int = 0


@dataclass
class Totals:
    """The sums of a run's requests."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    from_tier: dict[Tier, int] = field(default_factory=dict)
    max_logit_error: float = 0.0

    @classmethod
    def of(cls, results: list[RequestResult]) -> Totals:
        totals = cls(len(results))
        for result in results:
            totals.prompt_tokens += result.prompt_tokens
            totals.cached_tokens += result.cached_tokens
            for tier, n in result.from_tier.items():
                totals.from_tier[tier] = totals.from_tier.get(tier, 0) + n
            totals.max_logit_error = max(totals.max_logit_error, result.max_logit_error)
        return totals


def run(
    manager: BlockManager, model: Transformer, work: Workload, log=print
) -> list[RequestResult]:
    """Serve the workload's requests in turn; ``log`` gets one line per request."""
    gen = torch.Generator().manual_seed(work.seed)

    def words(n: int) -> list[int]:
        return torch.randint(0, model.dims.vocab, (n,), generator=gen).tolist()

    systems = [words(work.system_tokens) for _ in range(work.system_prompts)]
    histories = [list(systems[c % work.system_prompts]) for c in range(work.conversations)]
    results = []
    for turn in range(work.turns):
        for c, history in enumerate(histories):
            history += words(work.user_tokens)
            result = serve(manager, model, history, work.answer_tokens)
            history += result.answer
            results.append(result)
            log(
                f"request {len(results):3d}  conversation {c} turn {turn}:"
                f" {result.prompt_tokens:4d} prompt tokens, {result.cached_tokens:4d} cached"
                f" (blocks: {by_tier(result.from_tier)}),"
                f" max |logit error| {result.max_logit_error:.1e}"
            )
    return results


def by_tier(counts: dict[Tier, int]) -> str:
    """``"G1 4 G2 2"``: the tiers with a count, in tier order."""
    return " ".join(f"{t.name} {counts[t]}" for t in Tier if counts.get(t)) or "none"


def manager_config(
    dims: ModelDims,
    block_size: int,
    g1_blocks: int,
    g2_blocks: int,
    g3_blocks: int,
    offload_path: str,
    device_layout: DeviceLayout = DeviceLayout.BLOCK_FIRST,
    device_format: KvBlockLayout = KvBlockLayout.OperationalNHD,
    layer_groups: int = 2,
) -> BlockManagerConfig:
    """A manager of the cache of a model of ``dims``: blocks of ``block_size`` tokens, each tier
    ``g*_blocks`` blocks, G3's file in ``offload_path``, onboarding in ``layer_groups``; G1's
    tensors shaped as ``device_layout`` and ``device_format`` say (the engine's attention reads
    them through ``region_view``, whatever their shape)."""
    sizes = BlockManagerConfig(
        num_layers=dims.num_layers,
        num_kv_heads=dims.num_kv_heads,
        head_dim=dims.head_dim,
        block_size=block_size,
        dtype=dims.dtype,
        device_blocks=g1_blocks,
        device_layout=device_layout,
        device_format=device_format,
    )
    return replace(
        sizes,
        enable_offload=True,
        host_cache_gb=g2_blocks * sizes.block_bytes / 2**30,
        disk_cache_gb=g3_blocks * sizes.block_bytes / 2**30,
        offload_path=offload_path,
        onboard_layer_groups=layer_groups,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Serve a chat workload with a toy transformer whose paged KV cache is a"
        " BlockManager's G1 (on the GPU where there is one), and check every logit against a"
        " forward pass without cache."
    )
    parser.add_argument("--block-size", type=_at_least(1), default=16, help="tokens (16)")
    parser.add_argument("--g1-blocks", type=_at_least(1), default=40, help="device blocks (40)")
    parser.add_argument("--g2-blocks", type=_at_least(1), default=32, help="pinned blocks (32)")
    parser.add_argument("--g3-blocks", type=_at_least(0), default=256, help="disk blocks (256)")
    parser.add_argument(
        "--device-layout",
        choices=[d.name.lower().replace("_", "-") for d in DeviceLayout],
        default="block-first",
        help="shape of G1's tensors (block-first)",
    )
    parser.add_argument("--device-format", choices=["nhd", "hnd"], default="nhd")
    parser.add_argument("--conversations", type=_at_least(1), default=Workload.conversations)
    parser.add_argument("--turns", type=_at_least(1), default=Workload.turns)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest logit error")
    parser.add_argument("--quiet", action="store_true", help="print the summary only")
    args = parser.parse_args(argv)

    work = Workload(conversations=args.conversations, turns=args.turns)
    with tempfile.TemporaryDirectory() as disk:
        config = manager_config(
            ModelDims(),
            args.block_size,
            args.g1_blocks,
            args.g2_blocks,
            args.g3_blocks,
            disk,
            DeviceLayout[args.device_layout.upper().replace("-", "_")],
            KvBlockLayout.OperationalHND
            if args.device_format == "hnd"
            else KvBlockLayout.OperationalNHD,
        )
        try:
            with BlockManager(config) as manager:
                model = Transformer(ModelDims(), manager.device_tensors[0].device, seed=1)
                log = (lambda line: None) if args.quiet else print
                results = run(manager, model, work, log)
        except KvBlocksError as error:  # e.g. G1 too small for one request
            print(f"{parser.prog}: error: {error}", file=sys.stderr)
            return 1
    totals = Totals.of(results)
    print(
        f"{totals.requests} requests, {totals.prompt_tokens} prompt tokens: "
        f"{totals.cached_tokens} taken from the cache (blocks: {by_tier(totals.from_tier)}), "
        f"{totals.prompt_tokens - totals.cached_tokens} computed; "
        f"max |logit error| {totals.max_logit_error:.1e} (tolerance {args.tolerance:g})"
    )
    if not totals.max_logit_error <= args.tolerance:
        print("logits differ from the forward pass without cache", file=sys.stderr)
        return 1
    return 0


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {text!r}")
        return value

    return parse


if __name__ == "__main__":
    sys.exit(main())
