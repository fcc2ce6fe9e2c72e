"""The real stages on tiny models: every method × allocation × family, checkpoints round-tripped."""

import json

import pytest
import torch
from torch.testing import assert_close

from conftest import tiny_bert, tiny_causal_lm
from pruneflow.model import arch as A
from pruneflow.model import checkpoint
from pruneflow.errors import PruneflowError
from pruneflow.methods import METHODS
from pruneflow.pipeline.params import BonsaiParams, PruneParams
from pruneflow.prune import prune

WINDOWS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
TOLERANCE = 0.01
BONSAI = BonsaiParams(preset="fast", sub_models=8, n_windows=4, rows_per_forward=8, tolerance=0.005)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("method", sorted(m.name for m in METHODS.values() if m.widths))
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_every_width_method_prunes_30_percent_and_round_trips(kind, method, allocation, tmp_path):
    model = tiny_causal_lm(kind)
    spec = A.arch_for(model.config.model_type)
    dense = A.count_parameters(model)
    cfg = PruneParams(ratio=0.3, allocation=allocation, units=["heads", "channels"])  # minitron: its width scores
    if allocation not in METHODS[method].allocations:
        with pytest.raises(PruneflowError, match=f"prune.allocation: {method} removes units"):
            prune(model, spec, method, cfg, WINDOWS, options=BONSAI)
        return
    result = prune(model, spec, method, cfg, WINDOWS, options=BONSAI)
    after = A.count_parameters(model)
    achieved = 1 - after["non_embedding"] / dense["non_embedding"]
    assert achieved == pytest.approx(result.plan.params["achieved_ratio"])
    assert abs(achieved - 0.3) < TOLERANCE
    logits = model(input_ids=IDS).logits
    info = checkpoint.save(model, None, tmp_path / "out", spec,
                           extra_files={"plan.json": result.plan.to_json()})
    loaded, _, _ = checkpoint.load(tmp_path / "out", with_tokenizer=False)
    assert torch.equal(loaded(input_ids=IDS).logits, logits)
    assert A.count_parameters(loaded) == after
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["method"] == method
    assert (tmp_path / "out" / "modeling_pruneflow.py").exists() == (not info["vanilla"])
    assert all(p.grad is None for p in loaded.parameters()) and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_uniform_plan_without_bias_is_a_vanilla_checkpoint(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_causal_lm(kind)
    spec = A.arch_for(model.config.model_type)
    prune(model, spec, "wanda_sp", PruneParams(ratio=0.3, allocation="uniform", head_mode="group"), WINDOWS)
    info = checkpoint.save(model, None, tmp_path / "out", spec)
    assert info["vanilla"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == kind and "auto_map" not in config
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # no remote code
    assert torch.equal(plain(input_ids=IDS).logits, model(input_ids=IDS).logits)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_non_uniform_plan_loads_with_remote_code(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_causal_lm(kind)
    spec = A.arch_for(model.config.model_type)
    prune(model, spec, "flap", PruneParams(ratio=0.4, allocation="global"), WINDOWS)
    widths = A.layer_widths(model, spec)
    info = checkpoint.save(model, None, tmp_path / "out", spec)
    assert not info["vanilla"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == f"pruneflow_{kind}" and config["pruneflow_layers"] == widths
    with pytest.raises(ValueError):  # a stock load refuses instead of silently mis-sizing
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert torch.equal(remote(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_head_count_the_config_rejects_goes_to_the_remote_path(tmp_path):
    """8 → 6 heads at hidden 64: LlamaConfig validation rejects 64 % 6, so no vanilla config exists."""
    model = tiny_causal_lm("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    spec = A.arch_for("llama")
    prune(model, spec, "magnitude", PruneParams(ratio=0.035, allocation="uniform", units=["heads"]), WINDOWS)
    assert A.layer_widths(model, spec)[0]["heads"] == 6
    info = checkpoint.save(model, None, tmp_path / "out", spec)
    assert not info["vanilla"]
    loaded, _, _ = checkpoint.load(tmp_path / "out", with_tokenizer=False)
    assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_pruned_checkpoint_can_be_pruned_again(tmp_path):
    model = tiny_causal_lm("llama")
    spec = A.arch_for("llama")
    prune(model, spec, "flap", PruneParams(ratio=0.3), WINDOWS)
    checkpoint.save(model, None, tmp_path / "once", spec)
    again, _, _ = checkpoint.load(tmp_path / "once", with_tokenizer=False)
    before = A.count_parameters(again)["non_embedding"]
    prune(again, spec, "wanda_sp", PruneParams(ratio=0.2), WINDOWS)
    assert A.count_parameters(again)["non_embedding"] == pytest.approx(0.8 * before, rel=0.02)
    checkpoint.save(again, None, tmp_path / "twice", spec)
    reloaded, _, _ = checkpoint.load(tmp_path / "twice", with_tokenizer=False)
    assert torch.equal(reloaded(input_ids=IDS).logits, again(input_ids=IDS).logits)


@pytest.mark.parametrize("method", ["wanda_sp", "flap", "magnitude"])
def test_bert_encoder_prunes_and_round_trips(method, tmp_path):
    from transformers import AutoModel

    model = tiny_bert()
    dense = tiny_bert()
    spec = A.arch_for("bert")
    result = prune(model, spec, method, PruneParams(ratio=0.3), WINDOWS)
    assert abs(result.plan.params["achieved_ratio"] - 0.3) < TOLERANCE
    out = model(input_ids=IDS).last_hidden_state
    checkpoint.save(model, None, tmp_path / "out", spec)
    remote = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert_close(remote(input_ids=IDS).last_hidden_state, out, rtol=0, atol=0)
    assert torch.nn.functional.cosine_similarity(out, dense(input_ids=IDS).last_hidden_state, dim=-1).mean() > 0


def test_existing_output_directory_is_never_replaced_without_force(tmp_path):
    model = tiny_causal_lm("llama")
    spec = A.arch_for("llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "user-file.txt").write_text("mine")
    from pruneflow.errors import PruneflowError

    with pytest.raises(PruneflowError, match="already exists"):
        checkpoint.save(model, None, tmp_path / "out", spec)
    assert (tmp_path / "out" / "user-file.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dir left behind


def test_taylor_holds_gradients_of_the_scored_projections_only(monkeypatch):
    """Embeddings, norms and the LM head get no gradient (for a 128k vocabulary that is 2 × 0.5B values)."""
    from pruneflow.execution import losses
    from pruneflow.methods import taylor

    model = tiny_causal_lm("llama")
    spec = A.arch_for("llama")
    seen, real = [], losses.training_losses

    def spy(model_, batch, *rest):
        seen.append({n for n, p in model_.named_parameters() if p.requires_grad})
        return real(model_, batch, *rest)

    monkeypatch.setattr(taylor, "training_losses", spy)
    prune(model, spec, "taylor", PruneParams(ratio=0.3), WINDOWS)
    projections = {n for n, _ in model.named_parameters() if n.split(".")[-2].endswith("_proj")}
    assert seen and all(s == projections for s in seen)
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in seen[0])
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards
    assert all(p.grad is None for p in model.parameters())
