"""`pruneflow stage NAME`: the dvc.yaml stages on a tiny model, their fixed outputs and their errors."""

import json

import pytest
import yaml

from pruneflow.model import checkpoint
from tests.pipeline.test_cli import run


@pytest.fixture
def params_file(tiny_checkpoint, calibration_txt, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(tiny_checkpoint),
        "calibrate": {"source": str(calibration_txt), "n_windows": 4, "seqlen": 32},
        "score": {"method": "wanda_sp"},
        "prune": {"ratio": 0.25, "allocation": "global"},
        "recover": {"steps": 4, "batch_size": 2, "seqlen": 32, "warmup_steps": 1},
        "evaluate": {"max_windows": 4, "speed": False, "task_examples": 20}}))
    return path


def stage(name, params_file, artifacts, *extra):
    return run("stage", name, "--params", params_file, "--artifacts", artifacts, *extra)


def test_the_stages_run_in_order_and_write_their_outputs(params_file, tmp_path, tiny_checkpoint):
    from pruneflow.pipeline.graph import STAGES

    artifacts = tmp_path / "artifacts"
    for name in STAGES:
        result = stage(name, params_file, artifacts)
        assert result.exit_code == 0, result.output
    source = json.loads((artifacts / "source.json").read_text())
    assert source["model"] == str(tiny_checkpoint) and "model.safetensors" in source["files"]
    for name in STAGES:  # every stage records its seconds and peak memory (not a dependency of anything)
        resources = json.loads((artifacts / "resources" / f"{name}.json").read_text())
        assert resources["stage"] == name and resources["seconds"] > 0 and resources["peak_bytes"] > 2**20
        assert (resources["measure"], resources["device"], resources["dtype"]) == ("peak RSS", "cpu", "auto")
    assert (artifacts / "calibration" / "manifest.json").exists()
    assert json.loads((artifacts / "scores" / "scores.json").read_text())["method"] == "wanda_sp"
    model, _, _ = checkpoint.load(artifacts / "model")
    metrics = json.loads((artifacts / "metrics.json").read_text())
    assert metrics["achieved_ratio"] == pytest.approx(0.25, abs=0.02)
    assert metrics["pruned"]["non_embedding_params"] < metrics["dense"]["non_embedding_params"]
    assert metrics["final"] == "recovered"  # the gates judge the recovered model
    assert metrics["ppl_ratio"] == pytest.approx(metrics["recovered"]["test_ppl"] / metrics["dense"]["test_ppl"])
    assert metrics["ppl_ratio_pruned"] == pytest.approx(metrics["pruned"]["test_ppl"] / metrics["dense"]["test_ppl"])
    recovered, _, _ = checkpoint.load(artifacts / "recovered")
    assert [p.shape for p in recovered.parameters()] == [p.shape for p in model.parameters()]
    recovery = json.loads((artifacts / "recovered" / "recovery.json").read_text())
    assert len(recovery["history"]) == 4 and (artifacts / "recovered" / "loss.csv").read_text().count("\n") == 5
    assert sorted(p.name for p in artifacts.iterdir()) == [".state", "calibration", "export", "metrics.json",
                                                           "model", "recovered", "report", "resources", "scores",
                                                           "source.json"]
    for name in ("dense", "pruned", "recovered"):  # lm-eval accuracy on the local tasks, every model
        assert set(metrics[name]["tasks"]) == {"pruneflow_word_order", "pruneflow_next_sentence"}
    assert {"task.pruneflow_word_order", "task.pruneflow_next_sentence"} <= set(metrics["gates"])
    report = artifacts / "report"
    assert {"report.md", "ppl_vs_params.png", "kept_per_layer.png", "lm_eval.json"} <= {p.name for p in report.iterdir()}
    assert "pruneflow_word_order" in json.loads((report / "lm_eval.json").read_text())["versions"]
    assert "| wanda_sp −0.25 recovered |" in (report / "report.md").read_text()
    assert metrics["gates"]["achieved_ratio"]["passed"]
    assert [p.name for p in (artifacts / "export").iterdir()] == ["export.json"]  # export.formats: [] by default
    assert json.loads((artifacts / "export" / "export.json").read_text()) == {"formats": [], "model": None}

    assert stage("export", params_file, artifacts, "--set", "export.formats=[gguf]").exit_code == 0
    _assert_gguf_of(artifacts, artifacts / "recovered", "recovered")
    # one gate that fails (no tolerance for a ratio that is not exactly 0.25), every other one passes: not passed
    assert metrics["achieved_ratio"] != 0.25
    assert stage("evaluate", params_file, artifacts, "--set", "evaluate.ratio_tolerance=0", "--set",
                 "evaluate.max_ppl_ratio=1000", "--set", "evaluate.min_task_ratio=0.001").exit_code == 0
    strict = json.loads((artifacts / "metrics.json").read_text())
    assert [name for name, gate in strict["gates"].items() if not gate["passed"]] == ["achieved_ratio"]
    assert strict["gates_passed"] is False


def _assert_gguf_of(artifacts, model_dir, which):
    """artifacts/export holds a GGUF of ``model_dir``'s weights (one a LoRA merge changes: v_proj of block 0)."""
    import gguf
    import numpy as np

    from tests.conftest import safetensors_of

    summary = json.loads((artifacts / "export" / "export.json").read_text())
    assert summary["formats"] == ["gguf"] and summary["model"] == which
    weights = safetensors_of(model_dir)
    channels = [weights[f"model.layers.{i}.mlp.up_proj.weight"].shape[0] for i in range(summary["gguf"]["blocks"])]
    assert summary["gguf"]["path"] == "model.gguf" and summary["gguf"]["channels"] == channels
    uniform = len(set(zip(summary["gguf"]["heads"], channels))) == 1
    assert summary["gguf"]["architecture"] == ("llama" if uniform else "deci")
    reader = gguf.GGUFReader(artifacts / "export" / "model.gguf")
    v = weights["model.layers.0.self_attn.v_proj.weight"]
    written = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    assert np.array_equal(np.asarray(written.data).reshape(v.shape), v.float().numpy())


def test_recovery_off_records_a_skip_and_evaluate_judges_the_pruned_model(params_file, tmp_path):
    artifacts = tmp_path / "artifacts"
    for name in ("calibrate", "score", "prune", "recover", "evaluate", "export"):
        assert stage(name, params_file, artifacts, "--set", "recover.enabled=false",
                     "--set", "export.formats=[gguf]", "--set", "export.quantize=[q8_0]").exit_code == 0
    assert [p.name for p in (artifacts / "recovered").iterdir()] == ["recovery.json"]
    metrics = json.loads((artifacts / "metrics.json").read_text())
    assert metrics["final"] == "pruned" and "recovered" not in metrics
    assert metrics["ppl_ratio"] == metrics["ppl_ratio_pruned"]
    _assert_gguf_of(artifacts, artifacts / "model", "pruned")  # the export writes the final model too
    quantized = json.loads((artifacts / "export" / "export.json").read_text())["quantized"]["q8_0"]
    assert quantized["path"] == "model-q8_0.gguf" and quantized["tensors"]["Q8_0"] > 0
    assert (artifacts / "export" / "model-q8_0.gguf").stat().st_size == quantized["bytes"]
    # export.formats: [vllm] writes the final model as nemotron-nas under export/vllm (vLLM itself: test_vllm)
    assert stage("export", params_file, artifacts, "--set", "export.formats=[vllm]").exit_code == 0
    summary = json.loads((artifacts / "export" / "export.json").read_text())
    assert summary["formats"] == ["vllm"] and summary["model"] == "pruned" and summary["vllm"]["path"] == "vllm"
    config = json.loads((artifacts / "export" / "vllm" / "config.json").read_text())
    widths = [b["ffn"]["intermediate_size"] for b in config["block_configs"]]
    assert config["model_type"] == "nemotron-nas" and widths == summary["vllm"]["channels"]
    assert not (artifacts / "export" / "model.gguf").exists()  # the export directory is what this run asked for


def test_an_export_the_model_cannot_take_fails_in_the_source_stage(tmp_path, tiny_tokenizer, calibration_txt):
    """Checked on the config before any work: a qwen3 (q/k norms) with per-layer widths has no GGUF form, nor
    any nemotron-nas form for vLLM."""
    from tests.conftest import tiny_causal_lm

    qwen3 = tmp_path / "qwen3"
    tiny_causal_lm("qwen3", vocab_size=len(tiny_tokenizer)).save_pretrained(qwen3)
    tiny_tokenizer.save_pretrained(qwen3)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"model": str(qwen3), "calibrate": {"source": str(calibration_txt)},
                                      "score": {"method": "wanda_sp"}, "prune": {"allocation": "global"},
                                      "export": {"formats": ["gguf"]}}))
    artifacts = tmp_path / "artifacts"
    result = stage("source", params, artifacts)
    assert result.exit_code == 2
    assert "export.formats has gguf, but a qwen3 model with per-layer widths is not representable" in result.output
    assert not (artifacts / "source.json").exists()
    result = stage("source", params, artifacts, "--set", "export.formats=[vllm]")  # nemotron-nas: no q/k norms
    assert result.exit_code == 2 and "export.formats has vllm, but vLLM's per-layer format (nemotron-nas) has no " \
        "q/k norms" in result.output and not (artifacts / "source.json").exists()
    assert stage("source", params, artifacts, "--set", "prune.allocation=uniform").exit_code == 0


@pytest.mark.parametrize("override, message", [
    ("evaluate.ppl_seqlen=513", "evaluate.ppl_seqlen 513 exceeds the model's max positions (512)"),
    ("recover.seqlen=1024", "recover.seqlen 1024 exceeds the model's max positions (512)"),
    ("calibrate.seqlen=600", "calibrate.seqlen 600 exceeds the model's max positions (512)"),
])
def test_windows_past_the_models_positions_fail_in_the_source_stage(override, message, params_file, tmp_path):
    """Perplexity and recovery windows are read long after the pruning: they are checked with the model."""
    artifacts = tmp_path / "artifacts"
    result = stage("source", params_file, artifacts, "--set", override)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (artifacts / "source.json").exists()


def test_gates_fail_an_over_pruned_model_and_a_missed_ratio():
    from pruneflow.pipeline.params import load_params
    from pruneflow.pipeline.stages import gates

    params = load_params(None, ["prune.ratio=0.5"])
    over_pruned = gates({"achieved_ratio": 0.5, "ppl_ratio": 2.4}, params)
    assert not over_pruned["ppl_ratio"]["passed"] and over_pruned["achieved_ratio"]["passed"]
    missed = gates({"achieved_ratio": 0.45, "ppl_ratio": 1.2}, params)
    assert missed["ppl_ratio"]["passed"] and not missed["achieved_ratio"]["passed"]
    assert all(g["passed"] for g in gates({"achieved_ratio": 0.51, "ppl_ratio": 1.5}, params).values())


def test_an_iterative_method_scores_to_a_plan_that_prune_applies(params_file, tmp_path):
    artifacts = tmp_path / "artifacts"
    bonsai = ["--set", "score.method=bonsai", "--set", "score.bonsai.preset=fast", "--set", "prune.ratio=0.1",
              "--set", "score.bonsai.sub_models=8", "--set", "score.bonsai.n_windows=4"]
    for name in ("calibrate", "score", "prune"):
        result = stage(name, params_file, artifacts, *bonsai)
        assert result.exit_code == 0, result.output
    plan = json.loads((artifacts / "scores" / "plan.json").read_text())
    assert json.loads((artifacts / "model" / "plan.json").read_text()) == plan
    assert len(json.loads((artifacts / "scores" / "iterations.json").read_text())) == 2


def test_stages_fail_clearly_without_their_inputs_or_with_stale_ones(params_file, tmp_path):
    artifacts = tmp_path / "artifacts"
    result = stage("score", params_file, artifacts)
    assert result.exit_code == 2 and "calibration is missing: run the calibrate stage first" in result.output
    assert not (artifacts / "scores").exists()
    assert stage("calibrate", params_file, artifacts).exit_code == 0
    assert stage("score", params_file, artifacts).exit_code == 0
    stale = stage("prune", params_file, artifacts, "--set", "score.method=flap")
    assert stale.exit_code == 2 and "holds wanda_sp scores but score.method is flap" in stale.output
    assert not (artifacts / "model").exists()
    assert stage("prune", params_file, artifacts).exit_code == 0
    assert stage("recover", params_file, artifacts, "--set", "recover.enabled=false").exit_code == 0
    bad_task = stage("evaluate", params_file, artifacts, "--set", "evaluate.tasks=[no_such_task]")
    assert bad_task.exit_code == 2 and "unknown lm-eval task(s) no_such_task" in bad_task.output
    assert not (artifacts / "metrics.json").exists() and not (artifacts / "report").exists()
    local_typo = stage("evaluate", params_file, artifacts, "--set", "evaluate.tasks=[pruneflow_word_ordr]")
    assert local_typo.exit_code == 2 and "evaluate.tasks: unknown local task pruneflow_word_ordr" in local_typo.output
    unknown = stage("distill", params_file, artifacts)
    assert unknown.exit_code == 2 and "unknown stage 'distill'" in unknown.output


def test_iterative_state_goes_where_the_flow_points_it(params_file, tmp_path, monkeypatch):
    """Isolated flow runs keep Bonsai's iterations in the main checkout, which outlives their worktree."""
    from pruneflow.pipeline.stages import state_dir

    assert state_dir(tmp_path / "artifacts") == tmp_path / "artifacts" / ".state"
    monkeypatch.setenv("PRUNEFLOW_STATE_DIR", str(tmp_path / "main" / "state"))
    artifacts = tmp_path / "artifacts"
    bonsai = ["--set", "score.method=bonsai", "--set", "score.bonsai.preset=fast", "--set", "prune.ratio=0.1",
              "--set", "score.bonsai.sub_models=8", "--set", "score.bonsai.n_windows=4"]
    assert stage("calibrate", params_file, artifacts).exit_code == 0
    assert stage("score", params_file, artifacts, *bonsai).exit_code == 0
    assert any((tmp_path / "main" / "state").iterdir()) and not (artifacts / ".state").exists()


def test_evaluate_holds_one_model_at_a_time(tiny_checkpoint, tmp_path, monkeypatch):
    """Dense, pruned and recovered are loaded, measured and freed in turn: never two in memory at once."""
    import gc
    import weakref

    from pruneflow.model import checkpoint as ckpt
    from pruneflow.evaluation.evaluate import evaluate_dirs
    from pruneflow.pipeline.params import EvaluateParams

    loaded, real_load = [], ckpt.load

    def tracking_load(*args, **kwargs):
        gc.collect()
        assert all(ref() is None for ref in loaded), "a previous model is still alive"
        result = real_load(*args, **kwargs)
        loaded.append(weakref.ref(result[0]))
        return result

    monkeypatch.setattr(ckpt, "load", tracking_load)
    rows = evaluate_dirs({"a": tiny_checkpoint, "b": tiny_checkpoint, "c": tiny_checkpoint},
                         EvaluateParams(max_windows=2, speed=True, decode_tokens=4))
    assert len(loaded) == 3 and list(rows) == ["a", "b", "c"]
    assert all(row["prefill_ms"] > 0 and row["decode_tok_s"] > 0 for row in rows.values())


@pytest.mark.parametrize("method, options, check", [
    ("blockpruner", [], lambda plan: any(not layer["kept_heads"] or not layer["kept_channels"]
                                         for layer in plan["layers"])),
    ("laco", ["--set", "score.laco.threshold=-0.5"], lambda plan: plan["kept"]["merged_layers"]["merges"] == [[0, 1]]),
])
def test_a_unit_with_its_own_scores_goes_through_score_and_prune(method, options, check, params_file, tmp_path):
    artifacts = tmp_path / "artifacts"
    for name in ("calibrate", "score", "prune"):
        result = stage(name, params_file, artifacts, "--set", f"score.method={method}", "--set",
                       "prune.allocation=auto", *options)
        assert result.exit_code == 0, result.output
    plan = json.loads((artifacts / "model" / "plan.json").read_text())
    assert plan["method"] == method and check(plan)
    model, _, _ = checkpoint.load(artifacts / "model", with_tokenizer=False)
    assert sum(p.numel() for p in model.parameters()) == plan["params"]["total_after"]
