"""The hidden unit (Minitron): residual-stream channels removed from the embedding, every projection, every
norm and the head; the checkpoint stays vanilla; planted dead channels go first; bad input is refused."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_causal_lm, tiny_moe
from pruneflow.model import arch as A
from pruneflow.model import checkpoint
from pruneflow.errors import PruneflowError
from pruneflow.pipeline.params import PruneParams
from pruneflow.prune import prune

WINDOWS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))


def _sliced_reference(dense, kept: list[int]):
    """A stock model of the same family with hidden_size len(kept), its weights cut from ``dense``'s state dict
    by name alone (independent of pruneflow.units.hidden): which axis of which tensor is the hidden dimension."""
    config = type(dense.config)(**{**dense.config.to_dict(), "hidden_size": len(kept),
                                   "head_dim": A.geometry(dense.config).head_dim})
    reference = type(dense)(config).eval()
    index = torch.tensor(kept)
    state = {}
    for name, tensor in dense.state_dict().items():
        leaf = name.rsplit(".", 2)
        if name.endswith("mlp.gate.weight"):  # an MoE router (E, D)
            tensor = tensor[:, index]
        elif name.endswith("experts.gate_up_proj"):  # (E, 2I, D)
            tensor = tensor[:, :, index]
        elif name.endswith("experts.down_proj"):  # (E, D, I)
            tensor = tensor[:, index]
        elif name.endswith(("norm.weight",)) and "q_norm" not in name and "k_norm" not in name:
            tensor = tensor[index]  # block norms and the final norm (q/k norms are over head_dim)
        elif any(p in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) and leaf[-1] == "weight":
            tensor = tensor[:, index]
        elif any(p in name for p in ("o_proj", "down_proj")):
            tensor = tensor[index]
        elif "embed_tokens" in name or "lm_head" in name:
            tensor = tensor[:, index]
        state[name] = tensor
    reference.load_state_dict(state)
    return reference


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"])
def test_hidden_pruning_slices_every_tensor_and_saves_a_vanilla_checkpoint(kind, tmp_path):
    """Mixture-of-Experts models too: the router's columns and the fused experts' hidden axis; their width a
    multiple of 8 (grouped_mm's 16-byte strides)."""
    from transformers import AutoModelForCausalLM

    make = tiny_moe if kind in ("qwen3_moe", "mixtral") else tiny_causal_lm
    model, dense = make(kind), make(kind)
    spec = A.arch_for(kind)
    result = prune(model, spec, "minitron", PruneParams(ratio=0.3), WINDOWS)  # units auto: hidden
    kept = result.plan.kept_hidden
    step = 8 if spec.moe else dense.config.num_attention_heads
    assert result.plan.units == ["hidden"] and len(kept) % step == 0 and len(kept) < dense.config.hidden_size
    assert abs(result.plan.params["achieved_ratio"] - 0.3) <= step / dense.config.hidden_size  # half a step either way
    assert model.config.hidden_size == len(kept) and model.config.head_dim == A.geometry(dense.config).head_dim
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        torch.testing.assert_close(logits, _sliced_reference(dense, kept)(input_ids=IDS).logits, rtol=0, atol=0)
    info = checkpoint.save(model, None, tmp_path / "out", spec)
    assert info["vanilla"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == kind and config["hidden_size"] == len(kept)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # no remote code
    with torch.no_grad():
        assert torch.equal(plain(input_ids=IDS).logits, logits)
    assert A.count_parameters(plain)["non_embedding"] == result.plan.params["non_embedding_after"]


def test_planted_dead_hidden_channels_go_first():
    """Channels the embedding never writes and no block adds to stay zero in the residual stream: every norm
    outputs zero there, so Minitron's importance is exactly zero and they are the ones removed."""
    model = tiny_causal_lm("llama")
    spec = A.arch_for("llama")
    dead = [1, 6, 11, 17, 22, 30, 41, 50, 55, 58, 60, 63]  # 12 of 64
    with torch.no_grad():
        model.get_input_embeddings().weight[:, dead] = 0
        for block in A.blocks(model, spec):
            for path in (spec.o, spec.down):
                A.get(block, path).weight[dead] = 0
    from pruneflow.prune import score

    scores = score(model, spec, "minitron", WINDOWS)
    assert torch.all(scores.hidden[dead] == 0) and torch.all(scores.hidden[[i for i in range(64) if i not in dead]] > 0)
    ratio = 12 / 64  # every non-embedding tensor but the q/k norms holds the hidden dimension: 12 channels
    plan = prune(model, spec, "minitron", PruneParams(ratio=ratio), WINDOWS).plan
    assert sorted(set(range(64)) - set(plan.kept_hidden)) == dead


def test_a_hidden_pruned_model_recovers_and_serves_in_llama_cpp(tmp_path, tiny_tokenizer):
    """LoRA recovery with distillation from the dense model (the Minitron recipe) runs on the narrower model —
    the teacher's logits from its own head, whether the teacher is in memory or only its precomputed states —
    and the GGUF export holds the result: llama.cpp gives transformers' logits."""
    from pruneflow.pipeline import recover as R
    from pruneflow.model.export import export_gguf
    from pruneflow.pipeline.params import RecoverParams
    from tests.pipeline.test_export import llama_cpp_error

    vocab = len(tiny_tokenizer)
    spec = A.arch_for("llama")
    windows = torch.randint(0, vocab, (8, 32), generator=torch.Generator().manual_seed(0))

    def pruned():
        model = tiny_causal_lm("llama", vocab_size=vocab)
        prune(model, spec, "minitron", PruneParams(ratio=0.25), windows)
        return model

    teacher = tiny_causal_lm("llama", vocab_size=vocab)
    cfg = RecoverParams(steps=4, batch_size=2, seqlen=32, warmup_steps=1)
    states = R.teacher_states(teacher, windows, cfg, keep_head=True)
    with pytest.raises(PruneflowError, match="the pruned model's LM head is not the dense model's"):
        R.recover(pruned(), windows, spec, cfg, R.TeacherStates(states.states, states.head_digest))  # no head kept
    result = R.recover(pruned(), windows, spec, cfg, teacher)
    precomputed = R.recover(pruned(), windows, spec, cfg, states)
    assert all(h["kd"] > 0 and np.isfinite(h["loss"]) for h in result.history) and len(result.history) == 4
    assert [h["kd"] for h in precomputed.history] == pytest.approx([h["kd"] for h in result.history], rel=1e-5)
    checkpoint.save(result.model, tiny_tokenizer, tmp_path / "recovered", spec)
    summary = export_gguf(tmp_path / "recovered", tmp_path / "model.gguf", "f32")
    assert summary["architecture"] == "llama"
    loaded, _, _ = checkpoint.load(tmp_path / "recovered")
    assert llama_cpp_error(loaded, tmp_path / "model.gguf", vocab) < 1e-4


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_a_hidden_pruned_moe_model_recovers_and_serves_in_llama_cpp(kind, tmp_path, tiny_tokenizer):
    """The Minitron recipe on a Mixture-of-Experts model: LoRA on attention and the fused experts, distilled from
    the dense model, then GGUF as llama.cpp's MoE architecture with transformers' logits."""
    from pruneflow.pipeline import recover as R
    from pruneflow.model.export import export_gguf
    from pruneflow.pipeline.params import RecoverParams
    from tests.pipeline.test_export import llama_cpp_error

    vocab = len(tiny_tokenizer)
    spec = A.arch_for(kind)
    windows = torch.randint(0, vocab, (8, 32), generator=torch.Generator().manual_seed(0))
    model = tiny_moe(kind, vocab_size=vocab)
    prune(model, spec, "minitron", PruneParams(ratio=0.25), windows)
    cfg = RecoverParams(steps=3, batch_size=2, seqlen=32, warmup_steps=1)
    result = R.recover(model, windows, spec, cfg, tiny_moe(kind, vocab_size=vocab))
    assert all(h["kd"] > 0 and np.isfinite(h["loss"]) for h in result.history)
    checkpoint.save(result.model, tiny_tokenizer, tmp_path / "recovered", spec)
    export_gguf(tmp_path / "recovered", tmp_path / "model.gguf", "f32")
    loaded, _, _ = checkpoint.load(tmp_path / "recovered")
    assert loaded.config.hidden_size == 48
    assert llama_cpp_error(loaded, tmp_path / "model.gguf", vocab) < 1e-4


def test_the_stages_prune_recover_and_evaluate_the_hidden_unit(tmp_path, tiny_checkpoint, calibration_txt):
    """score → prune → recover (distillation, teacher states precomputed) → evaluate through `pruneflow stage`."""
    import yaml

    from tests.pipeline.test_cli import run

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "model": str(tiny_checkpoint), "calibrate": {"source": str(calibration_txt), "n_windows": 4, "seqlen": 32},
        "score": {"method": "minitron"}, "prune": {"ratio": 0.25},
        "recover": {"steps": 3, "batch_size": 2, "seqlen": 32, "warmup_steps": 1},
        "evaluate": {"max_windows": 4, "speed": False, "tasks": []}}))
    artifacts = tmp_path / "artifacts"
    for name in ("calibrate", "score", "prune", "recover", "evaluate"):
        result = run("stage", name, "--params", params, "--artifacts", artifacts)
        assert result.exit_code == 0, result.output
    dense = json.loads((tiny_checkpoint / "config.json").read_text())["hidden_size"]
    for name in ("model", "recovered"):
        config = json.loads((artifacts / name / "config.json").read_text())
        assert config["model_type"] == "llama" and config["hidden_size"] < dense  # vanilla, narrower
    assert json.loads((artifacts / "recovered" / "recovery.json").read_text())["teacher_precomputed"]
    metrics = json.loads((artifacts / "metrics.json").read_text())
    assert metrics["final"] == "recovered" and metrics["method"] == "minitron"
    assert metrics["recovered"]["non_embedding_params"] < metrics["dense"]["non_embedding_params"]


@pytest.mark.parametrize("method, cfg, message", [
    ("minitron", {"units": ["hidden", "heads"]}, "prune.units: hidden channels are pruned on their own"),
    ("minitron", {"units": ["hidden"], "reconstruct": "lstsq"}, "prune.reconstruct: lstsq re-fits"),
    ("flap", {"units": ["hidden"], "reconstruct": "none"}, "prune.units: method flap scores heads, channels, not hidden"),
    ("minitron", {"allocation": "global"}, "prune.allocation: minitron removes units uniformly"),
    ("minitron", {"ratio": 0.01}, "the hidden size 64 is kept a multiple of 4"),
    ("minitron", {"ratio": 0.3, "round_to": 64}, "the hidden size 64 is kept a multiple of 64"),
])
def test_bad_hidden_input_is_refused_before_the_model_changes(method, cfg, message):
    model = tiny_causal_lm("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruneflowError, match=message):
        prune(model, A.arch_for("llama"), method, PruneParams(**cfg), WINDOWS)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hidden_is_refused_for_an_encoder():
    from conftest import tiny_bert

    model = tiny_bert()
    with pytest.raises(PruneflowError, match="prune.units: hidden is supported for decoder LMs"):
        prune(model, A.arch_for("bert"), "minitron", PruneParams(ratio=0.3), WINDOWS)
