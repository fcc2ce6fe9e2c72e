"""The experts unit: whole experts of Mixture-of-Experts blocks (Qwen3-MoE, Mixtral) removed with their router
rows; the pruned model is the dense one with those experts' router logits at −inf; checkpoints round-trip
exactly (vanilla for equal counts, the per-layer loader otherwise); planted dead experts go first; bad input
is refused before any forward pass."""

import json

import pytest
import torch

from conftest import per_layer_round_trip, safetensors_of, tiny_causal_lm, tiny_moe
from pruneflow.model import arch as A
from pruneflow.model import checkpoint
from pruneflow.units import experts as X
from pruneflow.errors import PruneflowError
from pruneflow.pipeline.params import PruneParams
from pruneflow.prune import prune

WINDOWS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
KINDS = ["qwen3_moe", "mixtral"]
SPEC = A.arch_for("qwen3_moe")


def _masked_reference(dense, kept: list[list[int]]):
    """``dense`` with every block's removed experts' router logits at −inf: the experts module is handed the
    routing of X.route over the masked logits instead of the router's own (checked equal to it unmasked)."""
    handles = []
    for block, chosen in zip(A.blocks(dense, SPEC), kept):
        router, experts = X.parts(block, SPEC)
        dropped = torch.ones(experts.num_experts, dtype=torch.bool)
        dropped[chosen] = False

        def reroute(_module, args, router=router, dropped=dropped):
            x = args[0]
            weights, index = X.route(router, X.router_logits(router, x), dropped)
            return x, index, weights.to(x.dtype)

        handles.append(experts.register_forward_pre_hook(reroute))
    return handles


@pytest.mark.parametrize("kind", KINDS)
def test_route_reproduces_the_routers_own_choice(kind):
    model = tiny_moe(kind)
    x = torch.randn(50, model.config.hidden_size)
    for block in A.blocks(model, SPEC):
        router, experts = X.parts(block, SPEC)
        _, weights, index = router(x)
        mine_weights, mine_index = X.route(router, X.router_logits(router, x))
        assert torch.equal(mine_index, index) and torch.allclose(mine_weights.to(weights.dtype), weights)
        rebuilt = sum(X.expert_output(experts, e, x) * ((mine_index == e) * mine_weights).sum(-1, keepdim=True)
                      for e in range(experts.num_experts))
        torch.testing.assert_close(rebuilt, experts(x, index, weights), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["router_weighted", "expert_drop"])
def test_uniform_expert_pruning_is_the_masked_dense_model_and_saves_a_vanilla_checkpoint(kind, method, tmp_path):
    from transformers import AutoModelForCausalLM

    model, dense = tiny_moe(kind), tiny_moe(kind)
    spec = A.arch_for(kind)
    result = prune(model, spec, method, PruneParams(ratio=0.3), WINDOWS)
    kept = result.plan.kept_experts
    assert result.plan.units == ["experts"] and len({len(k) for k in kept}) == 1 and len(kept[0]) < 8
    assert model.config.num_experts_per_tok == 2 and A.blocks(model, spec)[0].mlp.gate.top_k == 2
    assert abs(result.plan.params["achieved_ratio"] - 0.3) < 0.1
    handles = _masked_reference(dense, kept)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        torch.testing.assert_close(logits, dense(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    for handle in handles:
        handle.remove()
    info = checkpoint.save(model, None, tmp_path / "out", spec)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert info["vanilla"] and config["model_type"] == kind
    assert config.get("num_experts", config.get("num_local_experts")) == len(kept[0])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # no remote code
    with torch.no_grad():
        assert torch.equal(plain(input_ids=IDS).logits, logits)
    assert A.count_parameters(plain)["non_embedding"] == result.plan.params["non_embedding_after"]


@pytest.mark.parametrize("kind", KINDS)
def test_global_expert_counts_use_the_per_layer_loader(kind, tmp_path):
    model = tiny_moe(kind, num_hidden_layers=3)
    spec = A.arch_for(kind)
    result = prune(model, spec, "router_weighted", PruneParams(ratio=0.3, allocation="global"), WINDOWS)
    counts = [len(k) for k in result.plan.kept_experts]
    assert len(set(counts)) > 1 and min(counts) >= 2  # standardized per layer, ranked across them
    loaded = per_layer_round_trip(model, spec, tmp_path / "out", IDS)
    assert [b.mlp.experts.num_experts for b in A.blocks(loaded, spec)] == counts


@pytest.mark.parametrize("method", ["router_weighted", "expert_drop"])
def test_planted_dead_experts_go_first(method):
    """Experts with a zero router row (rarely in the top-k) and zero output: removing them changes the least and
    they carry no routed output, so both criteria remove exactly them from every layer."""
    dead = (2, 5)
    model = tiny_moe("qwen3_moe", dead=dead)
    # two of eight experts per layer: the ratio whose uniform count is 2
    per_step = sum(X.expert_cost(b, SPEC) for b in A.blocks(model, SPEC))
    ratio = 2 * per_step / A.count_parameters(model)["non_embedding"]
    result = prune(model, SPEC, method, PruneParams(ratio=ratio), WINDOWS)
    assert result.plan.kept_experts == [[e for e in range(8) if e not in dead]] * 2
    if method == "router_weighted":
        assert all(float(s[list(dead)].max()) == 0 for s in result.scores.experts)


@pytest.mark.parametrize("ratio, allocation, message", [
    (0.001, "uniform", "less than one expert per layer"),
    (0.65, "uniform", "fewer than its top-k"),
    (0.85, "uniform", "remove every expert of layer 0"),
    (0.8, "global", "keeps at least its top-k"),
])
def test_bad_expert_plans_are_refused_before_any_forward_pass(ratio, allocation, message, monkeypatch):
    model = tiny_moe("qwen3_moe")
    monkeypatch.setattr(torch.nn.Module, "__call__", lambda *a, **k: pytest.fail("a forward pass ran"))
    with pytest.raises(PruneflowError, match=message):
        prune(model, SPEC, "router_weighted", PruneParams(ratio=ratio, allocation=allocation), WINDOWS)


def test_every_expert_of_a_layer_is_never_removed():
    model = tiny_moe("qwen3_moe", num_experts_per_tok=1)
    with pytest.raises(PruneflowError, match="every expert of layer 0"):
        X.removal_count(model, SPEC, 0.95)
    with pytest.raises(PruneflowError, match="removes every expert of layer 1"):
        X.apply(model, SPEC, [[0, 1], []])
    with pytest.raises(PruneflowError, match="fewer than its top-k"):
        X.apply(tiny_moe("qwen3_moe"), SPEC, [[0, 1], [3]])


def test_units_must_fit_the_architecture():
    with pytest.raises(PruneflowError, match="needs a Mixture-of-Experts model"):
        prune(tiny_causal_lm("llama"), A.arch_for("llama"), "router_weighted", PruneParams(ratio=0.2), WINDOWS)
    with pytest.raises(PruneflowError, match="pruned by whole experts"):
        prune(tiny_moe("mixtral"), A.arch_for("mixtral"), "wanda_sp", PruneParams(ratio=0.2), WINDOWS)
    with pytest.raises(PruneflowError, match="scores experts, not heads"):
        prune(tiny_moe("mixtral"), A.arch_for("mixtral"), "router_weighted",
              PruneParams(ratio=0.2, units=["experts", "heads"]), WINDOWS)


def test_expert_drop_refuses_too_many_combinations():
    from pruneflow.methods.options import ExpertDropParams
    from pruneflow.prune import score

    model = tiny_moe("qwen3_moe", experts=16)
    with pytest.raises(PruneflowError, match="combinations per layer"):
        score(model, SPEC, "expert_drop", WINDOWS, ratio=0.3, config=ExpertDropParams(max_combinations=100))


@pytest.mark.parametrize("method, allocation", [("expert_drop", "auto"), ("router_weighted", "global")])
def test_the_stages_prune_recover_and_evaluate_experts(method, allocation, tmp_path, moe_checkpoint,
                                                      calibration_txt):
    """source → calibrate → score → prune → recover (LoRA on attention and the fused experts, distilled) →
    evaluate through `pruneflow stage`, on an MoE checkpoint."""
    import yaml

    from tests.pipeline.test_cli import run

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": str(moe_checkpoint), "calibrate": {"source": str(calibration_txt), "n_windows": 4, "seqlen": 32},
        "score": {"method": method}, "prune": {"ratio": 0.3, "allocation": allocation},
        "recover": {"steps": 3, "batch_size": 2, "seqlen": 32, "warmup_steps": 1},
        "evaluate": {"max_windows": 4, "speed": False, "tasks": []}}))
    artifacts = tmp_path / "artifacts"
    for name in ("source", "calibrate", "score", "prune", "recover", "evaluate"):
        result = run("stage", name, "--params", params, "--artifacts", artifacts)
        assert result.exit_code == 0, result.output
    plan = json.loads((artifacts / "model" / "plan.json").read_text())
    counts = [len(k) for k in plan["kept"]["experts"]]
    assert min(counts) >= 2 and sum(counts) < 3 * 8
    for name in ("model", "recovered"):
        config = json.loads((artifacts / name / "config.json").read_text())
        if len(set(counts)) == 1:  # uniform (or a global ranking that came out so): a stock config
            assert config["model_type"] == "qwen3_moe" and config["num_local_experts"] == counts[0] < 8
        else:
            assert config["model_type"] == "pruneflow_qwen3_moe"
            assert [w["experts"] for w in config["pruneflow_layers"]] == counts
    recovered = safetensors_of(artifacts / "recovered")
    pruned = safetensors_of(artifacts / "model")
    changed = [n for n in pruned if not torch.equal(pruned[n], recovered[n])]
    assert any(".mlp.experts." in n for n in changed) and any("self_attn" in n for n in changed)  # LoRA merged
    metrics = json.loads((artifacts / "metrics.json").read_text())
    assert metrics["final"] == "recovered" and metrics["method"] == method
    assert metrics["recovered"]["non_embedding_params"] < metrics["dense"]["non_embedding_params"]


@pytest.mark.parametrize("model_kind, method, formats, allocation, message", [
    ("llama", "router_weighted", [], "auto", "experts needs a Mixture-of-Experts model"),
    ("moe", "flap", [], "auto", "pruned by whole experts"),
    ("moe", "router_weighted", ["gguf"], "global", "one expert count and one expert width for every layer"),
    ("moe", "router_weighted", ["onnx"], "auto", "ONNX export of Mixture-of-Experts models is not supported"),
])
def test_the_source_stage_refuses_what_the_model_cannot_do(model_kind, method, formats, allocation, message,
                                                           tmp_path, moe_checkpoint, tiny_checkpoint,
                                                           calibration_txt):
    import yaml

    from tests.pipeline.test_cli import run

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": str(moe_checkpoint if model_kind == "moe" else tiny_checkpoint),
                                      "calibrate": {"source": str(calibration_txt)}, "score": {"method": method},
                                      "prune": {"allocation": allocation}, "export": {"formats": formats}}))
    result = run("stage", "source", "--params", params, "--artifacts", tmp_path / "artifacts")
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "artifacts" / "source.json").exists()


def test_cli_prune_removes_experts_and_refuses_an_impossible_ratio(moe_checkpoint, calibration_txt, tmp_path):
    from tests.pipeline.test_cli import prune_args, run

    result = run(*prune_args(moe_checkpoint, tmp_path / "out", calibration_txt, "--method", "expert_drop",
                             "--ratio", 0.3, "--set", "score.expert_drop.max_combinations=1000"))
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["units"] == ["experts"] and len({len(k) for k in plan["kept"]["experts"]}) == 1
    result = run(*prune_args(moe_checkpoint, tmp_path / "bad", calibration_txt, "--method", "router_weighted",
                             "--ratio", 0.7))
    assert result.exit_code == 2 and "fewer than its top-k" in result.output
    assert not (tmp_path / "bad").exists()


def test_route_takes_many_dropped_sets_at_once():
    router = X.parts(A.blocks(tiny_moe("mixtral"), SPEC)[0], SPEC)[0]
    logits = torch.randn(30, 8)
    dropped = torch.zeros(3, 8, dtype=torch.bool)
    dropped[0, [1, 2]] = dropped[1, [0, 7]] = dropped[2, 5] = True
    weights, index = X.route(router, logits, dropped)
    assert weights.shape == index.shape == (3, 30, 2)
    for c in range(3):
        one_weights, one_index = X.route(router, logits, dropped[c])
        assert torch.equal(index[c], one_index) and torch.equal(weights[c], one_weights)
        assert not torch.isin(index[c], torch.where(dropped[c])[0]).any()


def test_expert_drop_loss_from_gram_matrices_is_the_direct_norm():
    """The paper's ‖Z − Z'‖ (Z' the block re-routed without the dropped experts, every expert's output summed
    explicitly) equals the Gram-matrix form expert_drop evaluates every combination with."""
    from pruneflow.methods.expert_drop import _distance, _moments

    block = A.blocks(tiny_moe("mixtral"), SPEC)[0]
    router, experts = X.parts(block, SPEC)
    x = torch.randn(40, 64)
    z = block.mlp(x[None])[0].double()
    gram, cross = _moments(experts, x, z, torch.float64)
    dropped = torch.zeros(4, 8, dtype=torch.bool)
    dropped[1, [0, 3]] = dropped[2, [1, 2, 6]] = dropped[3, 7] = True
    weights, index = X.route(router, X.router_logits(router, x), dropped)
    fast = _distance(gram, cross, (z * z).sum(-1), weights.double(), index)
    for c in range(4):
        rebuilt = sum(X.expert_output(experts, e, x).double() * ((index[c] == e) * weights[c]).sum(-1, keepdim=True)
                      for e in range(8))
        torch.testing.assert_close(fast[c], torch.linalg.vector_norm(z - rebuilt), rtol=1e-6, atol=1e-6)
    assert fast[0] < 1e-5  # nothing dropped: the block's own output


@pytest.mark.parametrize("kind", KINDS)
def test_an_expert_pruned_model_serves_in_llama_cpp_with_the_logits_of_transformers(kind, tmp_path, tiny_tokenizer):
    """Uniform expert counts export as llama.cpp's own MoE architecture (qwen3moe; llama with experts for
    Mixtral): router and stacked expert tensors, expert count and top-k in the header."""
    from pruneflow.model.export import export_gguf
    from tests.pipeline.test_export import llama_cpp_error

    model = tiny_moe(kind, vocab_size=len(tiny_tokenizer))
    spec = A.arch_for(kind)
    prune(model, spec, "router_weighted", PruneParams(ratio=0.3), WINDOWS)
    checkpoint.save(model, tiny_tokenizer, tmp_path / "pruned", spec)
    summary = export_gguf(tmp_path / "pruned", tmp_path / "model.gguf", "f32")
    assert summary["architecture"] == {"qwen3_moe": "qwen3moe", "mixtral": "llama"}[kind]
    error = llama_cpp_error(model, tmp_path / "model.gguf", len(tiny_tokenizer))
    assert error < 1e-4, error


def test_per_layer_expert_counts_are_refused_for_gguf_before_writing(tmp_path, tiny_tokenizer):
    from pruneflow.model.export import export_gguf

    model = tiny_moe("qwen3_moe", vocab_size=len(tiny_tokenizer))
    X.apply(model, SPEC, [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3]])
    checkpoint.save(model, tiny_tokenizer, tmp_path / "pruned", SPEC)
    with pytest.raises(PruneflowError, match="one expert count and one expert width for every layer"):
        export_gguf(tmp_path / "pruned", tmp_path / "model.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))
