"""The runtime object (devices, dtypes, placement, peak memory) and the chunked losses it relies on."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_causal_lm
from pruneflow.execution import losses
from pruneflow.errors import PruneflowError
from pruneflow.execution.runtime import Runtime, plan_gpu_placement, resolve_device, resolve_dtype

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30


def test_auto_is_the_cpu_here_and_named_devices_are_checked():
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    for name, message in [("cuda", "this torch build has no CUDA support"), ("cuda:2", "no CUDA"),
                          ("mps", r"MPS \(Apple GPU\) is not available"), ("tpu", "is not a device"),
                          ("meta", "is not supported")]:
        if torch.cuda.is_available() and name.startswith("cuda"):
            continue
        with pytest.raises(PruneflowError, match=message):
            resolve_device(name)
    assert resolve_dtype("auto") is None and resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(PruneflowError, match="dtype 'int8' is not supported"):
        resolve_dtype("int8")


def test_one_gpu_when_it_holds_the_weights_else_every_gpu_else_a_clear_error():
    free = {0: 80 * GIB, 1: 80 * GIB}
    assert plan_gpu_placement(16 * GIB, 0, free) == {"device_map": {"": 0}}
    assert plan_gpu_placement(16 * GIB, 1, free) == {"device_map": {"": 1}}
    spread = plan_gpu_placement(120 * GIB, 0, free)  # a 60B model in bf16 over two 80 GB GPUs
    assert spread["device_map"] == "auto" and set(spread["max_memory"]) == {0, 1}  # never "cpu" or "disk"
    with pytest.raises(PruneflowError, match=r"do not fit the free memory of the visible GPU\(s\)"):
        plan_gpu_placement(200 * GIB, 0, free)
    with pytest.raises(PruneflowError, match="use --device cpu"):
        plan_gpu_placement(100 * GIB, 0, {0: 80 * GIB})


def test_cpu_statistics_keep_a_small_variance_under_a_large_mean():
    """FLAP's fluctuation is Σx² − (Σx)²/n: inputs of mean 1000 and std 0.01 over 4,096 tokens cancel 8 digits,
    which float32 sums lose entirely; the runtime's accumulation on the CPU keeps them."""
    from pruneflow.selection.scores import InputStats

    x = 1000 + 0.01 * torch.randn(4096, 3, generator=torch.Generator().manual_seed(0))
    stats = InputStats()
    stats.add(x, Runtime().accum_dtype)
    torch.testing.assert_close(stats.var.double(), x.double().var(0), rtol=1e-3, atol=0)


def test_the_peak_window_resets_and_sees_an_allocation():
    runtime = Runtime()
    runtime.reset_peak()
    before = runtime.peak_bytes()["peak_bytes"]
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after = runtime.peak_bytes()
    assert after["measure"] == "peak RSS" and after["peak_bytes"] - before > 48 * 2**20
    del block


def test_chunked_token_losses_equal_the_full_logits(monkeypatch):
    model = tiny_causal_lm("llama")
    ids = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    full = F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1), reduction="none").view(3, 16)
    monkeypatch.setattr(losses, "LOGIT_BYTES", 4 * 256 * 5)  # 5 positions per chunk: 11 chunks
    assert losses.chunk_rows(256) == 5
    torch.testing.assert_close(losses.token_nll(model, ids), full, rtol=0, atol=1e-6)


def test_chunked_training_losses_give_the_full_losses_and_gradients(monkeypatch):
    student, teacher = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1)
    teacher.lm_head.weight.data.copy_(student.lm_head.weight.data)
    teacher.model.embed_tokens.weight.data.copy_(student.model.embed_tokens.weight.data)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        teacher_hidden = losses.hidden_states(teacher, ids)
        teacher_logits = teacher(input_ids=ids).logits
    logits = student(input_ids=ids).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    kd = F.kl_div(F.log_softmax(logits.reshape(-1, 256), -1), F.log_softmax(teacher_logits.reshape(-1, 256), -1),
                  log_target=True, reduction="batchmean")
    (ce + kd).backward()
    expected = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    monkeypatch.setattr(losses, "LOGIT_BYTES", 4 * 256 * 7)
    chunked_ce, chunked_kd = losses.training_losses(student, ids, teacher_hidden)
    (chunked_ce + chunked_kd).backward()
    torch.testing.assert_close(chunked_ce, ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_kd, kd, rtol=1e-5, atol=1e-6)
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


BLOCKED = "import sys; [sys.modules.__setitem__(m, None) for m in ('prefect', 'mlflow', 'dvc', 'lm_eval')]; "


def test_the_library_and_the_gpu_benchmark_run_without_the_orchestration_packages(tmp_path):
    """The lent GPU machine has torch/transformers/peft/accelerate but no prefect, mlflow, dvc or lm-eval."""
    script = (BLOCKED + "import runpy; sys.argv = ['gpu.py', '--tiny', '--device', 'cpu', '--out', "
              f"{str(tmp_path / 'gpu.json')!r}]; runpy.run_path('benchmarks/gpu.py', run_name='__main__'); "
              "import pruneflow.pipeline.stages, pruneflow.pipeline.recover, pruneflow.evaluation.evaluate, pruneflow.cli")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    report = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["method"] for r in report["scoring"]] == ["flap", "wanda_sp"]
    assert [r["sub_models_per_forward"] for r in report["bonsai"]] == [1, 2, 4, 8]
    assert max(r["max_loss_diff"] for r in report["bonsai"]) < 1e-4  # batching masks changes no loss
    assert [r["model"] for r in report["speed"]] == ["dense", "flap −20%", "flap −50%"]
    assert report["speed"][2]["achieved_ratio"] == pytest.approx(0.5, abs=0.02)
    assert report["speed"][2]["ideal_speedup"] > report["speed"][1]["ideal_speedup"] > 1
    assert "| flap −50% |" in proc.stdout
