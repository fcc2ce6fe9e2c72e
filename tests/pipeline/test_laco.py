"""LaCo and the merged-layers unit: the merge arithmetic of the paper and of the released code, the plan gives the
model the method measured, the result is a stock checkpoint llama.cpp runs, and what cannot merge is refused."""

import json

import pytest
import torch

from conftest import tiny_causal_lm, tiny_moe
from pruneflow.model import arch as A
from pruneflow.model import checkpoint
from pruneflow.units.apply import apply
from pruneflow.errors import PruneflowError
from pruneflow.model.export import export_gguf
from pruneflow.methods import laco
from pruneflow.methods.options import LacoParams
from pruneflow.pipeline.params import PruneParams
from pruneflow.prune import prune
from pruneflow.execution.runtime import Runtime
from pruneflow.units import merged_layers as M

WINDOWS = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("formula", ["paper", "code"])
def test_a_merge_is_rdsc_in_the_paper_and_the_top_block_in_the_released_code(formula):
    model = tiny_causal_lm("qwen2", num_hidden_layers=3)  # q/k/v biases are merged too
    spec = A.arch_for(model.config.model_type)
    blocks = list(A.blocks(model, spec))
    theta = [M.projections(b, spec) for b in blocks]
    out = M.merged(blocks, spec, formula)
    assert len(out) == len(theta[0]) == 10  # 7 weights, 3 biases
    for i, value in enumerate(out):
        expected = theta[0][i] + (theta[1][i] - theta[0][i]) + (theta[2][i] - theta[0][i]) if formula == "paper" \
            else theta[2][i]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)


def test_scoring_leaves_the_model_as_it_was():
    model = tiny_causal_lm("llama", num_hidden_layers=8)
    spec = A.arch_for(model.config.model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = laco.score(model, spec, WINDOWS, Runtime(), ratio=0.3, config=LacoParams(threshold=0.0))
    assert len(scores.extra["merges"]) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_the_plan_gives_the_model_the_method_measured_and_a_stock_checkpoint(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_causal_lm(kind, num_hidden_layers=8)
    spec = A.arch_for(model.config.model_type)
    dense = laco.last_hidden(model, WINDOWS[:5], torch.device("cpu"))
    result = prune(model, spec, "laco", PruneParams(ratio=0.3), WINDOWS, options=LacoParams(threshold=0.0))
    plan, trials = result.plan, result.scores.extra["trials"]
    merges = plan.kept["merged_layers"]["merges"]
    assert merges and sum(m for _, m in merges) == 8 - len(plan.kept_layers) == 2
    assert len(A.blocks(model, spec)) == model.config.num_hidden_layers == len(plan.kept_layers)
    assert [b.self_attn.layer_idx for b in A.blocks(model, spec)] == list(range(len(plan.kept_layers)))
    merged = laco.last_hidden(model, WINDOWS[:5], torch.device("cpu"))
    cosine = torch.stack([torch.nn.functional.cosine_similarity(a, b, dim=0) for a, b in zip(dense, merged)]).mean()
    accepted = [t for t in trials if t["accepted"]]
    assert cosine.item() == pytest.approx(accepted[-1]["cosine"], abs=1e-5)
    assert checkpoint.save(model, None, tmp_path / "out", spec)["vanilla"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(plain(input_ids=IDS).logits, model(input_ids=IDS).logits)
    again = tiny_causal_lm(kind, num_hidden_layers=8)  # the saved plan re-applied to the dense model
    apply(again, plan.from_dict(json.loads(plan.to_json())), spec)
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_a_merge_below_the_threshold_is_rejected_and_the_shortfall_reported(caplog):
    model = tiny_causal_lm("llama", num_hidden_layers=8)
    spec = A.arch_for(model.config.model_type)
    scores = laco.score(model, spec, WINDOWS, Runtime(), ratio=0.3, config=LacoParams(threshold=0.999))
    assert len(scores.extra["merges"]) == 0 and not any(t["accepted"] for t in scores.extra["trials"])
    assert [t["base"] for t in scores.extra["trials"]] == [4, 3, 2, 1, 0]  # from the top, one layer at a time
    assert "fold 0 of the 2 blocks" in caplog.text


def test_llama_cpp_runs_the_merged_model_like_transformers(tmp_path, tiny_tokenizer):
    from tests.pipeline.test_export import llama_cpp_error

    model = tiny_causal_lm("llama", vocab_size=len(tiny_tokenizer), num_hidden_layers=8)
    spec = A.arch_for(model.config.model_type)
    prune(model, spec, "laco", PruneParams(ratio=0.3), WINDOWS, options=LacoParams(threshold=0.0))
    checkpoint.save(model, tiny_tokenizer, tmp_path / "out", spec)
    summary = export_gguf(tmp_path / "out", tmp_path / "m.gguf", "f32")
    assert summary["architecture"] == "llama" and summary["blocks"] == 6
    assert llama_cpp_error(model, tmp_path / "m.gguf", len(tiny_tokenizer)) < 1e-4


@pytest.mark.parametrize("settings, message", [
    ({"units": ["merged_layers", "heads"]}, "scores merged_layers, not heads"),
    ({"units": ["merged_layers"], "reconstruct": "lstsq"}, "reconstruct: none"),
    ({"units": ["merged_layers"], "allocation": "uniform"}, "set prune.allocation: global"),
])
def test_what_laco_cannot_do_is_refused_before_any_forward_pass(settings, message, monkeypatch):
    model = tiny_causal_lm("llama", num_hidden_layers=4)
    monkeypatch.setattr(laco, "last_hidden", lambda *_: pytest.fail("a forward pass ran before the refusal"))
    with pytest.raises(PruneflowError, match=message):
        prune(model, A.arch_for("llama"), "laco", PruneParams(ratio=0.3, **settings), WINDOWS)


def test_laco_refuses_moe_and_per_layer_widths(monkeypatch):
    monkeypatch.setattr(laco, "last_hidden", lambda *_: pytest.fail("a forward pass ran before the refusal"))
    moe = tiny_moe()
    with pytest.raises(PruneflowError, match="Mixture.of.Experts"):
        prune(moe, A.arch_for(moe.config.model_type), "laco", PruneParams(ratio=0.3), WINDOWS)
    model = tiny_causal_lm("llama", num_hidden_layers=4)
    spec = A.arch_for("llama")
    prune(model, spec, "magnitude", PruneParams(ratio=0.2, allocation="global"), WINDOWS)
    with pytest.raises(PruneflowError, match="per-layer widths"):
        prune(model, spec, "laco", PruneParams(ratio=0.3), WINDOWS)
