"""Bonsai end to end on a tiny model: reaches the ratio, loads back, resumes after an interrupted iteration."""

import json

import pytest
import torch

from pruneflow.model import arch as A
from pruneflow.model import checkpoint
from pruneflow.methods import SCORERS
from pruneflow.pipeline.params import BonsaiParams, PruneParams
from pruneflow.prune import prune
from tests.conftest import tiny_causal_lm
from tests.pipeline.test_cli import prune_args, run

FAST = BonsaiParams(preset="fast", sub_models=16, n_windows=4, rows_per_forward=16)


def _windows(n=8, length=24):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(0))


def test_bonsai_fast_preset_reaches_the_target_ratio():
    model = tiny_causal_lm()
    spec = A.arch_for("llama")
    result = prune(model, spec, "bonsai", PruneParams(ratio=0.3, allocation="global"), _windows(), seed=0,
                   options=BonsaiParams(preset="fast", n_windows=4))
    achieved = result.plan.params["achieved_ratio"]
    assert abs(achieved - 0.3) <= 0.02
    assert len(result.iterations) == 6  # 0.3 / prune_frac 0.05
    assert [round(s["achieved_ratio"], 2) for s in result.iterations] == [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]
    assert A.count_parameters(model)["non_embedding"] == result.plan.params["non_embedding_after"]
    # the composed plan, applied to the original model in one step, gives the same model
    from pruneflow.units.apply import apply

    fresh = tiny_causal_lm()
    apply(fresh, result.plan, spec)
    ids = _windows(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_resume_after_an_interrupted_iteration_gives_the_same_plan(tmp_path, monkeypatch):
    spec = A.arch_for("llama")
    cfg = PruneParams(ratio=0.2, allocation="global")
    uninterrupted = prune(tiny_causal_lm(), spec, "bonsai", cfg, _windows(), seed=3, options=FAST,
                          state_dir=tmp_path / "a")

    real, calls = SCORERS["bonsai"], []

    def killed_at_iteration_2(*args, iteration, **kwargs):
        calls.append(iteration)
        if iteration == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, iteration=iteration, **kwargs)

    monkeypatch.setitem(SCORERS, "bonsai", killed_at_iteration_2)
    with pytest.raises(KeyboardInterrupt):
        prune(tiny_causal_lm(), spec, "bonsai", cfg, _windows(), seed=3, options=FAST, state_dir=tmp_path / "b")
    (store,) = (tmp_path / "b").iterdir()
    assert sorted(p.name for p in store.iterdir()) == ["iter_000.json", "iter_000.safetensors",
                                                       "iter_001.json", "iter_001.safetensors"]
    calls.clear()
    monkeypatch.setitem(SCORERS, "bonsai", lambda *a, **k: (calls.append(k["iteration"]), real(*a, **k))[1])
    resumed = prune(tiny_causal_lm(), spec, "bonsai", cfg, _windows(), seed=3, options=FAST,
                    state_dir=tmp_path / "b")
    assert calls == [2, 3]  # iterations 0 and 1 came from the store
    assert resumed.plan.to_json() == uninterrupted.plan.to_json()
    # a different seed is a different run: it never reuses that store
    prune(tiny_causal_lm(), spec, "bonsai", cfg, _windows(), seed=4, options=FAST, state_dir=tmp_path / "b")
    assert len(list((tmp_path / "b").iterdir())) == 2


def test_saved_iterations_hold_masks_losses_and_weights(tmp_path, caplog):
    import logging

    from safetensors.torch import load_file

    spec = A.arch_for("llama")
    model = tiny_causal_lm()
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with caplog.at_level(logging.INFO, logger="pruneflow.selection.iterations"):
        prune(model, spec, "bonsai", PruneParams(ratio=0.05, allocation="global"), _windows(), seed=0,
              options=FAST, state_dir=tmp_path)
    from pruneflow.sizes import format_size

    assert f"resume key: hashing {format_size(weight_bytes)} of weights" in caplog.text  # never silent work
    (store,) = tmp_path.iterdir()
    tensors = load_file(store / "iter_000.safetensors")
    assert tensors["keep"].shape[0] == 16 and tensors["losses"].shape == (16,)
    assert tensors["importance"].shape == tensors["priors"].shape == tensors["candidates"].shape
    summary = json.loads((store / "iter_000.json").read_text())["summary"]
    assert summary["sub_models"] == 16 and -1 <= summary["cv_tau"] <= 1


def test_cli_prunes_with_bonsai_and_the_checkpoint_loads(tiny_checkpoint, calibration_txt, tmp_path):
    out = tmp_path / "bonsai"
    result = run(*prune_args(tiny_checkpoint, out, calibration_txt, "--method", "bonsai", "--ratio", 0.1,
                             "--allocation", "global", "--set", "score.bonsai.preset=fast",
                             "--set", "score.bonsai.sub_models=8", "--set", "score.bonsai.n_windows=4"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / ".bonsai.state").is_dir()
    iterations = json.loads((out / "iterations.json").read_text())
    assert len(iterations) == 2 and iterations[-1]["achieved_ratio"] == pytest.approx(0.1, abs=0.02)
    model, _, _ = checkpoint.load(out)
    assert A.count_parameters(model)["non_embedding"] == json.loads((out / "plan.json").read_text())["params"][
        "non_embedding_after"]
    bad = run(*prune_args(tiny_checkpoint, tmp_path / "x", calibration_txt, "--method", "bonsai",
                          "--set", "score.bonsai.n_windows=99"))
    assert bad.exit_code == 2 and "score.bonsai.n_windows=99" in bad.output and not (tmp_path / "x").exists()
