"""The channels unit on a Mixture-of-Experts model: the MLP channels inside every expert, scored by the width
methods from each expert's own weights and routed tokens; each expert keeps its own best channels, as many as
the other experts of its block. The pruned model is the dense one with those channels zeroed; checkpoints
round-trip exactly (vanilla for one width everywhere, the per-layer loader otherwise); planted dead channels go
first; bad settings are refused before any forward pass."""

import json

import pytest
import torch

from conftest import per_layer_round_trip, safetensors_of
from conftest import tiny_moe as dense_moe
from pruneflow.model import arch as A
from pruneflow.model import checkpoint
from pruneflow.units import expert_channels as XC
from pruneflow.errors import PruneflowError
from pruneflow.pipeline.params import PruneParams
from pruneflow.prune import prune

WINDOWS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
KINDS = ["qwen3_moe", "mixtral"]
SPEC = A.arch_for("qwen3_moe")
WIDTH = 128  # an expert's channels: widths move in steps of 8 (grouped_mm's alignment), 6% of the parameters here


def tiny_moe(kind: str = "qwen3_moe", **overrides):
    return dense_moe(kind, **{"moe_intermediate_size" if kind == "qwen3_moe" else "intermediate_size": WIDTH,
                              **overrides})


def channels(ratio: float, allocation: str = "uniform", **extra) -> PruneParams:
    return PruneParams(**{"ratio": ratio, "units": ["channels"], "allocation": allocation, "reconstruct": "none",
                          **extra})


@torch.no_grad()
def _zeroed(dense, kept: list[list[list[int]]]) -> None:
    """``dense`` with every expert's removed channels' up rows zeroed: act(gate) · 0 feeds its down_proj zero."""
    for block, chosen in zip(A.blocks(dense, SPEC), kept):
        experts = block.mlp.experts
        width = experts.down_proj.shape[2]
        for e, keep in enumerate(chosen):
            gone = [j for j in range(width) if j not in set(keep)]
            experts.gate_up_proj[e, [width + j for j in gone]] = 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["magnitude", "wanda_sp", "flap"])
def test_uniform_expert_channels_are_the_zeroed_dense_model_and_save_a_vanilla_checkpoint(kind, method, tmp_path):
    from transformers import AutoModelForCausalLM

    model, dense = tiny_moe(kind), tiny_moe(kind)
    spec = A.arch_for(kind)
    result = prune(model, spec, method, channels(0.3), WINDOWS)
    kept = result.plan.kept_expert_channels
    widths = {len(c) for layer in kept for c in layer}
    assert result.plan.units == ["channels"] and len(widths) == 1 and widths.pop() < WIDTH
    assert len({tuple(c) for c in kept[0]}) > 1  # each expert keeps its own channels
    assert abs(result.plan.params["achieved_ratio"] - 0.3) < 0.05
    _zeroed(dense, kept)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        torch.testing.assert_close(logits, dense(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    info = checkpoint.save(model, None, tmp_path / "out", spec)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert info["vanilla"] and config["model_type"] == kind
    width = len(kept[0][0])
    if kind == "qwen3_moe":  # its intermediate_size is for dense MLPs (mlp_only_layers): unchanged
        assert config["moe_intermediate_size"] == width and config["intermediate_size"] == 96
    else:
        assert config["intermediate_size"] == width
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # no remote code
    with torch.no_grad():
        assert torch.equal(plain(input_ids=IDS).logits, logits)
    assert A.count_parameters(plain)["non_embedding"] == result.plan.params["non_embedding_after"]


@torch.no_grad()
def _kill(block, dead: list[int]) -> None:
    """Zero channels ``dead`` of every expert of ``block``: gate and up rows, down column."""
    experts = block.mlp.experts
    experts.gate_up_proj[:, dead] = 0
    experts.gate_up_proj[:, [WIDTH + j for j in dead]] = 0
    experts.down_proj[:, :, dead] = 0


def test_global_selection_ranks_steps_of_eight_across_layers():
    """Comparable scores, layer 1's far below the others': layer 1 gives up its channels first, in steps of 8,
    each expert its own weakest ones."""
    from pruneflow.selection.plan import SelectConfig
    from pruneflow.selection.scores import Scores

    model = tiny_moe("qwen3_moe", num_hidden_layers=3)
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(8, WIDTH, generator=gen) + offset for offset in (10.0, 0.0, 10.0)]
    plan = XC.select(model, SPEC, Scores(heads=[], channels=scores, comparable=True),
                     SelectConfig(ratio=0.2, allocation="global", units=("channels",)), "test")
    widths = plan.params["expert_width_after"]
    assert widths[0] == widths[2] == WIDTH and widths[1] < WIDTH and widths[1] % 8 == 0
    assert abs(plan.params["achieved_ratio"] - 0.2) < 0.02
    for e, kept in enumerate(plan.kept_expert_channels[1]):
        assert kept == sorted(torch.argsort(scores[1][e], descending=True)[:widths[1]].tolist())


@pytest.mark.parametrize("kind", KINDS)
def test_per_layer_expert_widths_use_the_per_layer_loader(kind, tmp_path):
    model = tiny_moe(kind, num_hidden_layers=3)
    spec = A.arch_for(kind)
    gen = torch.Generator().manual_seed(0)
    kept = [[sorted(torch.randperm(WIDTH, generator=gen)[:w].tolist()) for _ in range(8)] for w in (96, 40, 128)]
    dense = tiny_moe(kind, num_hidden_layers=3)
    XC.apply(model, spec, kept)
    _zeroed(dense, kept)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, dense(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    loaded = per_layer_round_trip(model, spec, tmp_path / "out", IDS)
    assert [b.mlp.experts.down_proj.shape[2] for b in A.blocks(loaded, spec)] == [96, 40, 128]


def test_wanda_sp_scores_every_expert_from_the_tokens_routed_to_it():
    """Wanda-sp's mean_i |W[i, j]| · ‖X_j‖₂ with W an expert's down_proj and X its input over the tokens the
    router sends it, recomputed from the experts module's own inputs."""
    model = tiny_moe("mixtral")
    seen = []
    block = A.blocks(model, SPEC)[1]
    handle = block.mlp.experts.register_forward_pre_hook(lambda _m, args: seen.append((args[0], args[1])))
    result = prune(model, SPEC, "wanda_sp", channels(0.2), WINDOWS)
    handle.remove()
    experts = block.mlp.experts  # pruned now: recompute from a fresh copy of the dense weights
    dense = A.blocks(tiny_moe("mixtral"), SPEC)[1].mlp.experts
    x = torch.cat([s[0].reshape(-1, 64) for s in seen])
    index = torch.cat([s[1].reshape(-1, s[1].shape[-1]) for s in seen])
    for e in range(8):
        token = torch.where(index == e)[0]
        gate, up = torch.nn.functional.linear(x[token], dense.gate_up_proj[e]).chunk(2, dim=-1)
        h = (dense.act_fn(gate) * up).double()
        expected = dense.down_proj[e].double().abs().mean(0) * h.pow(2).sum(0).sqrt()
        torch.testing.assert_close(result.scores.channels[1][e].double(), expected, rtol=1e-5, atol=1e-7)
    assert experts.down_proj.shape[2] < WIDTH


@pytest.mark.parametrize("method", ["magnitude", "wanda_sp", "flap"])
def test_planted_dead_channels_go_first(method):
    """Channels whose gate and up rows and down column are zero in every expert: no weight, no output, no
    input variance — every criterion removes exactly them."""
    model = tiny_moe("qwen3_moe")
    dead = [3, 7, 20, 31, 64, 90, 100, 127]  # one step of 8
    for block in A.blocks(model, SPEC):
        _kill(block, dead)
    per_step = sum(XC.slot_cost(b, SPEC) for b in A.blocks(model, SPEC))
    ratio = len(dead) * per_step / A.count_parameters(model)["non_embedding"]
    result = prune(model, SPEC, method, channels(ratio), WINDOWS)
    alive = [j for j in range(WIDTH) if j not in dead]
    assert result.plan.kept_expert_channels == [[alive] * 8] * 2


@pytest.mark.parametrize("method, params, message", [
    ("wanda_sp", channels(0.001), "removes no channel from the experts"),
    ("wanda_sp", channels(0.99), "remove every channel of the experts of layer 0"),
    ("wanda_sp", channels(0.9, "global"), "at most"),
    ("wanda_sp", channels(0.3, "search"), "removed uniformly or globally"),
    ("flap", PruneParams(ratio=0.3, units=["channels"], allocation="uniform", reconstruct="bias"),
     "carries no bias"),
    ("wanda_sp", channels(0.3, round_to=WIDTH), "not smaller than layer 0's expert width"),
    ("taylor", channels(0.3), "does not score the channels inside experts"),
    ("bonsai", channels(0.3, "global"), "does not score the channels inside experts"),
    ("wanda_sp", PruneParams(ratio=0.3, units=["heads", "channels"], allocation="uniform"), "not heads, channels"),
])
def test_bad_expert_channel_settings_are_refused_before_any_forward_pass(method, params, message, monkeypatch):
    model = tiny_moe("qwen3_moe")
    monkeypatch.setattr(torch.nn.Module, "__call__", lambda *a, **k: pytest.fail("a forward pass ran"))
    with pytest.raises(PruneflowError, match=message):
        prune(model, SPEC, method, params, WINDOWS)


def test_bad_expert_channel_plans_are_refused():
    model = tiny_moe("qwen3_moe")
    full = [list(range(WIDTH))] * 8
    with pytest.raises(PruneflowError, match="the same, non-zero number of channels"):
        XC.apply(model, SPEC, [full, [list(range(WIDTH))] * 7 + [list(range(16))]])
    with pytest.raises(PruneflowError, match="outside 0..127"):
        XC.apply(model, SPEC, [full, [[0, 140]] * 8])
    with pytest.raises(PruneflowError, match="expert channel lists for 1 layers"):
        XC.apply(model, SPEC, [full])


@pytest.mark.parametrize("kind", KINDS)
def test_an_expert_channel_pruned_model_serves_in_llama_cpp_with_the_logits_of_transformers(kind, tmp_path,
                                                                                           tiny_tokenizer):
    """One expert width everywhere exports as llama.cpp's MoE architecture, the width in the header."""
    from pruneflow.model.export import export_gguf
    from tests.pipeline.test_export import llama_cpp_error

    model = tiny_moe(kind, vocab_size=len(tiny_tokenizer))
    spec = A.arch_for(kind)
    prune(model, spec, "wanda_sp", channels(0.3), WINDOWS)
    checkpoint.save(model, tiny_tokenizer, tmp_path / "pruned", spec)
    export_gguf(tmp_path / "pruned", tmp_path / "model.gguf", "f32")
    error = llama_cpp_error(model, tmp_path / "model.gguf", len(tiny_tokenizer))
    assert error < 1e-4, error


def test_the_stages_prune_recover_and_evaluate_expert_channels(tmp_path, moe_checkpoint, calibration_txt):
    """source → calibrate → score → prune → recover (LoRA on attention and the fused experts) → evaluate through
    `pruneflow stage`, by the channels inside the experts; FLAP's own compensation is refused in the source stage
    (it adds a bias experts do not have), so the run sets reconstruct: none."""
    import yaml

    from tests.pipeline.test_cli import run

    params = tmp_path / "params.yaml"
    settings = {
        "model": str(moe_checkpoint), "calibrate": {"source": str(calibration_txt), "n_windows": 4, "seqlen": 32},
        "score": {"method": "flap"}, "prune": {"ratio": 0.3, "units": ["channels"]},
        "recover": {"steps": 3, "batch_size": 2, "seqlen": 32, "warmup_steps": 1},
        "evaluate": {"max_windows": 4, "speed": False, "tasks": []}}
    params.write_text(yaml.safe_dump(settings))
    artifacts = tmp_path / "artifacts"
    result = run("stage", "source", "--params", params, "--artifacts", artifacts)
    assert result.exit_code == 2 and "carries no bias" in result.output
    assert not (artifacts / "source.json").exists()
    settings["prune"]["reconstruct"] = "none"
    params.write_text(yaml.safe_dump(settings))
    for name in ("source", "calibrate", "score", "prune", "recover", "evaluate"):
        result = run("stage", name, "--params", params, "--artifacts", artifacts)
        assert result.exit_code == 0, result.output
    plan = json.loads((artifacts / "model" / "plan.json").read_text())
    widths = [len(layer[0]) for layer in plan["kept"]["expert_channels"]]
    assert plan["allocation"] == "global" and max(widths) < 32
    config = json.loads((artifacts / "model" / "config.json").read_text())
    if len(set(widths)) == 1:
        assert config["model_type"] == "qwen3_moe" and config["moe_intermediate_size"] == widths[0]
    else:
        assert [w["channels"] for w in config["pruneflow_layers"]] == widths
    recovered, pruned = safetensors_of(artifacts / "recovered"), safetensors_of(artifacts / "model")
    changed = [n for n in pruned if not torch.equal(pruned[n], recovered[n])]
    assert any(".mlp.experts." in n for n in changed) and any("self_attn" in n for n in changed)  # LoRA merged
    metrics = json.loads((artifacts / "metrics.json").read_text())
    assert metrics["final"] == "recovered" and metrics["recovered"]["non_embedding_params"] < \
        metrics["dense"]["non_embedding_params"]


def test_the_cli_prunes_expert_channels(moe_checkpoint, calibration_txt, tmp_path):
    from tests.pipeline.test_cli import prune_args, run

    result = run(*prune_args(moe_checkpoint, tmp_path / "out", calibration_txt, "--method", "wanda_sp",
                             "--ratio", 0.3, "--units", "channels", "--allocation", "uniform"))
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["moe_intermediate_size"] < 32
    result = run(*prune_args(moe_checkpoint, tmp_path / "bad", calibration_txt, "--method", "taylor",
                             "--ratio", 0.3, "--units", "channels"))
    assert result.exit_code == 2 and "does not score the channels inside experts" in result.output
    assert not (tmp_path / "bad").exists()


def test_a_moe_model_with_dense_mlp_blocks_is_refused_before_any_forward_pass(monkeypatch):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from conftest import MOE

    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**MOE, "vocab_size": 256, "num_experts": 8, "head_dim": 16,
                                                  "moe_intermediate_size": 32, "mlp_only_layers": [1]}))
    monkeypatch.setattr(torch.nn.Module, "__call__", lambda *a, **k: pytest.fail("a forward pass ran"))
    with pytest.raises(PruneflowError, match=r"blocks \[1\] of this model have a dense MLP"):
        prune(model, SPEC, "wanda_sp", channels(0.2), WINDOWS)
