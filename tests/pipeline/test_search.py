"""prune.allocation: search — per-layer counts searched from the method's own plan on calibration loss."""

import json

import pytest
import torch
import yaml

from conftest import tiny_causal_lm
from pruneflow.model import arch as A
from pruneflow.model import checkpoint
from pruneflow.execution import streaming
from pruneflow.units.apply import layer_shapes
from pruneflow.errors import PruneflowError
from pruneflow.pipeline.params import PruneParams, load_params
from pruneflow.selection.plan import removal_target
from pruneflow.prune import prune, select_config
from pruneflow.execution.runtime import Runtime
from pruneflow.selection.search import masked_loss

WINDOWS = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(0))
SEARCH = {"budget": 12, "windows": 4, "offspring": 4, "seed": 1}


def _search(model, method="wanda_sp", ratio=0.4, **prune):
    cfg = PruneParams(ratio=ratio, allocation="search", search=SEARCH, **prune)
    return prune_(model, method, cfg)


def prune_(model, method, cfg, runtime=None):
    return prune(model, A.arch_for("llama"), method, cfg, WINDOWS, runtime=runtime)


def _sliced_loss(plan, **geometry) -> float:
    """Mean next-token cross-entropy on WINDOWS of the dense model with ``plan`` physically applied (slicing,
    not the search's masks), computed from the logits here."""
    from pruneflow.units.apply import apply

    model = tiny_causal_lm(**geometry)
    apply(model, plan, A.arch_for("llama"))
    with torch.no_grad():
        logits = model(input_ids=WINDOWS).logits.double()
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   WINDOWS[:, 1:].reshape(-1)))


def test_search_keeps_the_exact_ratio_and_never_loses_to_its_start():
    """Fitness on every calibration window, so the start (wanda_sp's own uniform plan) and the found plan can
    be re-scored independently: sliced out of the dense model, the found plan's loss is the reported best and no
    worse than the start's."""
    geometry = dict(num_hidden_layers=4, intermediate_size=128)
    model = tiny_causal_lm(**geometry)
    shapes, params = layer_shapes(model, A.arch_for("llama")), A.count_parameters(model)
    cfg = PruneParams(ratio=0.4, allocation="search", search={**SEARCH, "windows": len(WINDOWS)})
    result = prune_(model, "wanda_sp", cfg)
    summary = result.search
    assert summary["start_allocation"] == "uniform"  # wanda_sp's own
    start = prune_(tiny_causal_lm(**geometry), "wanda_sp", PruneParams(ratio=0.4)).plan
    start_loss, found_loss = _sliced_loss(start, **geometry), _sliced_loss(result.plan, **geometry)
    assert summary["start_loss"] == pytest.approx(start_loss, rel=1e-5)
    assert summary["best_loss"] == pytest.approx(found_loss, rel=1e-5)
    assert found_loss < start_loss  # on this model the search finds a better allocation within its budget
    assert [h["evaluated"] for h in summary["history"]] == [1, 5, 9, 12]  # the budget, start included
    target = removal_target(shapes, params["non_embedding"], select_config(PruneParams(ratio=0.4), result.scores))
    removed = params["non_embedding"] - A.count_parameters(model)["non_embedding"]
    assert abs(removed - target) <= max(s.channel_cost for s in shapes) / 2
    assert result.plan.allocation == "search"
    widths = {len(layer.kept_channels) for layer in result.plan.layers}
    assert len(widths) > 1  # the search moved channels between layers


def test_search_is_seeded_and_its_fitness_is_the_masked_models_loss():
    plans = [_search(tiny_causal_lm(num_hidden_layers=3, intermediate_size=128)).plan for _ in range(2)]
    assert plans[0].layers == plans[1].layers
    dense = tiny_causal_lm(num_hidden_layers=3, intermediate_size=128)
    spec = A.arch_for("llama")
    shapes = layer_shapes(dense, spec)
    masked = masked_loss(dense, spec, plans[0], shapes, WINDOWS[:4], Runtime())
    sliced = tiny_causal_lm(num_hidden_layers=3, intermediate_size=128)
    from pruneflow.units.apply import apply
    from pruneflow.execution.losses import token_nll

    apply(sliced, plans[0], spec)
    with torch.no_grad():
        assert masked == pytest.approx(float(token_nll(sliced, WINDOWS[:4]).double().mean()), rel=1e-5)


def test_search_streams(tmp_path):
    dense = tmp_path / "dense"
    tiny_causal_lm(num_hidden_layers=8).save_pretrained(dense, max_shard_size="300KB")
    plans = []
    for budget in (None, 1_100_000):
        runtime = Runtime(max_memory=budget)
        model, _, spec = checkpoint.load(dense, runtime, with_tokenizer=False, stream=True, calibration=WINDOWS.shape)
        assert streaming.is_streamed(model) == (budget is not None)
        plans.append(prune_(model, "flap", PruneParams(ratio=0.3, allocation="search", search=SEARCH), runtime).plan)
    assert plans[0].layers == plans[1].layers


def test_a_streamed_generation_reads_each_block_once(tmp_path, monkeypatch):
    """Streamed, the candidates of one generation share one pass over the blocks (not one pass each)."""
    dense = tmp_path / "dense"
    tiny_causal_lm(num_hidden_layers=4).save_pretrained(dense, max_shard_size="300KB")
    runtime = Runtime(max_memory=1_100_000)
    model, _, spec = checkpoint.load(dense, runtime, with_tokenizer=False, stream=True, calibration=WINDOWS.shape)
    candidates, passes, inside = [], [], []
    real_nll, real_blocks = streaming.token_nll_batches, streaming.each_block

    def token_nll_batches(model, spec, batches, runtime, *args):
        candidates.append(len(batches))
        passes.append(0)
        inside.append(True)
        yield from real_nll(model, spec, batches, runtime, *args)
        inside.pop()

    def each_block(*args, **kwargs):
        if inside:
            passes[-1] += 1
        return real_blocks(*args, **kwargs)

    monkeypatch.setattr(streaming, "token_nll_batches", token_nll_batches)
    monkeypatch.setattr(streaming, "each_block", each_block)
    prune_(model, "flap", PruneParams(ratio=0.3, allocation="search", search=SEARCH), runtime)
    assert candidates == [1, 4, 4, 3]  # the start, then generations of `offspring` up to the budget of 12
    assert passes == [1, 1, 1, 1]


def test_search_bad_input():
    with pytest.raises(PruneflowError, match="prune.search.budget"):
        load_params(None, ["prune.allocation=search", "prune.search.budget=0"])
    with pytest.raises(PruneflowError, match="search moves heads and MLP channels"):
        load_params(None, ["prune.allocation=search", "prune.units=[heads]"])
    with pytest.raises(PruneflowError, match="search moves heads and MLP channels"):
        load_params(None, ["prune.allocation=search", "score.method=angular"])
    with pytest.raises(PruneflowError, match="bonsai removes units globally"):
        load_params(None, ["prune.allocation=search", "score.method=bonsai"])
    # a depth method under params that search and re-fit: one error names both keys to change
    with pytest.raises(PruneflowError, match=r"use allocation: auto.*use reconstruct: none \(or auto\)"):
        load_params(None, ["prune.allocation=search", "prune.reconstruct=lstsq", "score.method=sleb"])


def test_the_prune_stage_searches_and_reconstructs(tiny_checkpoint, calibration_txt, tmp_path):
    """The pipeline's prune stage runs the search and the lstsq re-fit on the calibration windows and keeps
    their reports beside the plan."""
    from tests.pipeline.test_cli import run

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": str(tiny_checkpoint), "calibrate": {"source": str(calibration_txt), "n_windows": 16, "seqlen": 32},
        "score": {"method": "flap"},
        "prune": {"ratio": 0.3, "allocation": "search", "reconstruct": "lstsq", "search": SEARCH}}))
    artifacts = tmp_path / "artifacts"
    for name in ("source", "calibrate", "score", "prune"):
        result = run("stage", name, "--params", params, "--artifacts", artifacts)
        assert result.exit_code == 0, result.output
    model_dir = artifacts / "model"
    plan = json.loads((model_dir / "plan.json").read_text())
    assert (plan["allocation"], plan["reconstruct"]) == ("search", "lstsq")
    assert len(json.loads((model_dir / "search.json").read_text())["history"]) == 4
    assert {"o", "down"} <= set(json.loads((model_dir / "reconstruction.json").read_text())[0])
    checkpoint.load(model_dir)
