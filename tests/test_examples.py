"""examples/tiny_engine.py: a toy engine whose attention reads the BlockManager's G1 gets the
logits of a forward pass without cache, whichever tier its prefixes come back from."""

import importlib.util
import pathlib
import sys

import pytest
import torch

from kvblocks.layout import KvBlockLayout
from kvblocks.pool import BlockManager, DeviceLayout, Tier

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "tiny_engine.py"


@pytest.fixture(scope="module")
def engine():
    spec = importlib.util.spec_from_file_location("tiny_engine", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def open_manager(engine, tmp_path, *shape) -> BlockManager:
    """The example's manager: G1 40 blocks, G2 32, G3 256, blocks of 16 tokens; G1's tensors
    shaped by ``shape`` (a DeviceLayout and a KvBlockLayout), or as the example's default."""
    return BlockManager(
        engine.manager_config(engine.ModelDims(), 16, 40, 32, 256, str(tmp_path), *shape)
    )


def run_workload(engine, manager):
    model = engine.Transformer(engine.ModelDims(), manager.device_tensors[0].device, seed=1)
    return engine.run(manager, model, engine.Workload(), log=lambda line: None)


@pytest.mark.parametrize(
    "shape",
    [
        (DeviceLayout.BLOCK_FIRST, KvBlockLayout.OperationalNHD),
        (DeviceLayout.OUTER_FIRST, KvBlockLayout.OperationalHND),
        (DeviceLayout.OUTER_SEPARATE, KvBlockLayout.OperationalNHD),
        (DeviceLayout.FULLY_CONTIGUOUS, KvBlockLayout.OperationalHND),
    ],
    ids=lambda shape: f"{shape[0].name}-{shape[1].name}",
)
def test_logits_match_a_forward_pass_without_cache_from_every_tier(engine, tmp_path, shape):
    with open_manager(engine, tmp_path, *shape) as manager:
        results = run_workload(engine, manager)
    totals = engine.Totals.of(results)
    assert totals.requests == 24
    assert all(totals.from_tier.get(tier, 0) > 0 for tier in (Tier.G1, Tier.G2, Tier.G3))
    assert 0 < totals.cached_tokens < totals.prompt_tokens
    assert all(r.cached_tokens == 16 * sum(r.from_tier.values()) for r in results)
    assert all(r.max_logit_error < 1e-4 for r in results)
    assert all(len(r.answer) == engine.Workload().answer_tokens for r in results)


def test_the_check_sees_blocks_that_came_back_wrong(engine, tmp_path, monkeypatch):
    """Noise written over G2 before each request: the requests that take blocks from G2 get
    logits far from the forward pass without cache, those before the first such one do not
    (later ones may extend a conversation whose KV was computed from noise)."""
    serve = engine.serve
    with open_manager(engine, tmp_path) as manager:
        g2 = manager.layout(Tier.G2).allocations[0].view().view(torch.float32)

        def serve_after_noise(*args):
            manager.flush()
            g2.normal_()
            return serve(*args)

        monkeypatch.setattr(engine, "serve", serve_after_noise)
        results = run_workload(engine, manager)
    from_g2 = [i for i, r in enumerate(results) if r.from_tier.get(Tier.G2)]
    assert from_g2 and all(results[i].max_logit_error > 1e-2 for i in from_g2)
    assert all(r.max_logit_error < 1e-4 for r in results[: from_g2[0]])


def test_main_prints_a_summary_and_refuses_bad_sizes(engine, capsys):
    assert engine.main(["--conversations", "3", "--turns", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("6 requests, ") and "max |logit error|" in out
    assert engine.main(["--g1-blocks", "5", "--quiet"]) == 1
    assert "cannot allocate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        engine.main(["--turns", "0"])
    assert exit_.value.code == 2
    assert "--turns: expected an int >= 1" in capsys.readouterr().err


def test_a_request_takes_the_blocks_its_computed_tokens_fill(engine, tmp_path):
    """21 prompt tokens and 12 answer tokens: the KV of 32 tokens (the last answer token's is
    never needed) fills exactly 2 blocks of 16, both registered."""
    with open_manager(engine, tmp_path) as manager:
        model = engine.Transformer(engine.ModelDims(), manager.device_tensors[0].device, seed=1)
        prompt = list(range(100, 121))
        run = engine.generate(manager, model, prompt, 12)
        assert len(run.block_ids) == 2 and run.logits.shape == (21 + 11, 512)
        assert len(run.tokens) == 33 and run.first_token_s > 0
        again = engine.serve(manager, model, run.tokens[:32] + [7], 3)
    assert again.cached_tokens == 32 and again.from_tier == {Tier.G1: 2}
    assert again.max_logit_error < 1e-4
