"""``pruneflow prune --dry-run``: the plan of work from the config alone, and its peak memory against a measured
run (in memory and streamed, each in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_causal_lm
from pruneflow.cli import app
from pruneflow.execution.estimate import estimate
from pruneflow.pipeline.params import load_params
from pruneflow.execution.runtime import Runtime

LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
             "num_hidden_layers": 80, "vocab_size": 128256, "max_position_embeddings": 131072,
             "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
             "torch_dtype": "bfloat16", "hidden_act": "silu"}

MEASURE = """
import gc, json, sys, torch
from pathlib import Path
torch.set_num_threads(1)
from conftest import tiny_causal_lm
from memory import LiveTensors
from pruneflow.model import checkpoint
from pruneflow.pipeline.params import load_params
from pruneflow.prune import prune
from pruneflow.execution.runtime import Runtime, _trim_heap
updates, out = json.loads(sys.argv[1]), Path(sys.argv[2])

def run(path, out, **more):
    params = load_params(None, [], updates={**updates, "model": str(path), **more})
    runtime = Runtime.from_params(params.runtime)
    windows = torch.randint(0, 64, (params.calibrate.n_windows, params.calibrate.seqlen))
    model, _, spec = checkpoint.load(params.model, runtime, with_tokenizer=False, stream=True,
                                     calibration=tuple(windows.shape))
    prune(model, spec, params.score.method, params.prune, windows, runtime=runtime)
    checkpoint.save(model, None, out, spec, dtype=torch.float32, runtime=runtime)
    return runtime

# the same run on a model of a few KiB first: what it imports and sets up once is not the model's memory
tiny_causal_lm(vocab_size=64, num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
               num_key_value_heads=2).save_pretrained(out / "warm-model")
run(out / "warm-model", out / "warm-out", **({"runtime.max_memory": "2MiB"} if "runtime.max_memory" in updates else {}))
gc.collect()
_trim_heap()
def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
base = rss()
with LiveTensors() as live:
    runtime = Runtime.from_params(load_params(None, [], updates=updates).runtime)
    runtime.reset_peak()
    runtime = run(updates["model"], out / "pruned")
print(json.dumps({"tensors": live.peak, "resident": runtime.peak_bytes()["peak_bytes"] - base}))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """24 blocks of width 256 and a 32k vocabulary (the head and embedding are 32 MiB each in float32)."""
    path = tmp_path_factory.mktemp("dry") / "model"
    tiny_causal_lm(vocab_size=32768, num_hidden_layers=24, hidden_size=256, intermediate_size=1024,
                   num_attention_heads=8, num_key_value_heads=4).save_pretrained(path, max_shard_size="20MB")
    return path


def test_a_config_alone_of_a_70b_model_gives_the_plan_of_work(tmp_path, monkeypatch):
    import psutil

    memory = psutil.virtual_memory()._replace(available=64 * 2**30)  # a 64 GiB machine, wherever this runs
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))  # no weights, no tokenizer
    result = CliRunner().invoke(app, ["prune", str(tmp_path), "--dry-run", "--method", "bonsai", "--device", "cpu",
                                      "--max-memory", "20GiB"], env={"COLUMNS": "160"})
    assert result.exit_code in (0, 1), result.output
    assert "70,553,706,496 parameters" in result.output  # Llama-3.1-70B's published count
    assert "131.4 GiB of bfloat16 weights" in result.output and "streamed a block at a time" in result.output
    assert "bonsai sub-models" in result.output and "×6" in result.output  # ⌈0.3 / 0.05⌉ iterations
    result = CliRunner().invoke(app, ["prune", str(tmp_path), "--dry-run", "--method", "flap", "--device", "cpu"])
    assert result.exit_code == 1 and "does not fit" in result.output and "64.0 GiB" in result.output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("max_memory", [None, "120MiB"])
def test_the_estimated_peak_bounds_a_measured_run(model_dir, tmp_path, max_memory):
    """The estimate is never below the tensor bytes a run holds at once (counted at every torch operation: what a
    GPU's allocator reports), and not more than 15% above the run's resident memory (measured after the same run
    on a model of a few KiB, so imports and one-time set-up are not counted) — in memory and streamed."""
    updates = {"model": str(model_dir), "score.method": "flap", "calibrate.n_windows": 16, "calibrate.seqlen": 64,
               "runtime.device": "cpu", **({"runtime.max_memory": max_memory} if max_memory else {})}
    params = load_params(None, [], updates=updates)
    planned = estimate(model_dir, params, Runtime.from_params(params.runtime))
    assert planned.streamed == (max_memory is not None)
    tests = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(updates), str(tmp_path)], capture_output=True,
                         text=True, check=True, cwd=tests.parent,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])})
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["tensors"] <= planned.peak_bytes <= 1.15 * measured["resident"], (
        f"estimated {planned.peak_bytes:,}, measured {measured}")


def test_a_dry_run_refuses_what_pruneflow_cannot_prune(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    result = CliRunner().invoke(app, ["prune", str(tmp_path), "--dry-run"])
    assert result.exit_code == 2 and "error:" in result.output and "gpt2" in result.output


def test_prune_without_out_or_dry_run_is_a_clear_error(model_dir):
    result = CliRunner().invoke(app, ["prune", str(model_dir)])
    assert result.exit_code == 2 and "--out" in result.output and "--dry-run" in result.output


def test_the_objectives_reference_is_counted_in_the_peak_and_leaves_room_in_the_streamed_groups(tmp_path):
    """kl/hidden keep the unmasked model's final hidden states of the measured windows on the host (2 bytes per
    value in bf16): on a CPU the estimate adds them to the phase's peak, and under --max-memory the streamed
    groups shrink to leave room for them, so the peak stays within the budget."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    updates = {"model": str(tmp_path), "score.method": "flap", "prune.allocation": "search", "runtime.device": "cpu",
               "runtime.max_memory": "6GiB", "calibrate.n_windows": 64, "calibrate.seqlen": 512,
               "prune.search.windows": 64}  # a budget the fixed part (a block's work, the head) nearly fills
    phases = {}
    for kind in ("loss", "kl"):
        params = load_params(None, [], updates={**updates, "score.objective": kind})
        plan = estimate(tmp_path, params, Runtime.from_params(params.runtime))
        phases[kind] = next(p for p in plan.phases if p.name == "allocation search")
    assert phases["loss"].host_bytes == 0 and phases["kl"].host_bytes == 64 * 512 * 8192 * 2
    assert phases["kl"].passes > phases["loss"].passes  # smaller groups: more passes over the blocks
    assert phases["kl"].peak_bytes - phases["kl"].host_bytes < phases["loss"].peak_bytes
    assert phases["kl"].peak_bytes <= 6 * 2**30
    result = CliRunner().invoke(app, ["prune", str(tmp_path), "--dry-run", "--method", "flap", "--allocation",
                                      "search", "--objective", "kl", "--device", "cpu", "--max-memory", "6GiB"],
                                env={"COLUMNS": "160"})
    assert "score.objective kl: the unmasked model's final hidden states" in result.output, result.output
