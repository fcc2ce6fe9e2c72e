"""Crash and resume: `kill -9` during each stage, then rerun. Completed stages are not recomputed, the final
checkpoint and metrics equal an uninterrupted run's, and no partial output is ever visible under artifacts/."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pruneflow.pipeline.graph import STAGES
from pruneflow.tasks.stage import dvc_bin, dvc_env
from tests.conftest import make_project

COMPLETE = {"calibration": "manifest.json", "scores": "scores.json", "model": "pruneflow.json",
            "recovered": "recovery.json", "export": "export.json"}  # written inside the temp dir, so present iff the output is whole


def _repro(project, *args):
    # unbuffered: what dvc printed before a SIGKILL is in the pipe, not lost in its buffer
    return subprocess.Popen([dvc_bin(), "repro", *args], cwd=project, env={**dvc_env(), "PYTHONUNBUFFERED": "1"},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _stage_process(root: psutil.Process, stage: str):
    for child in root.children(recursive=True):
        try:
            if child.cmdline()[-2:] == ["stage", stage] or child.cmdline()[-3:-1] == ["stage", stage]:
                return child
        except psutil.Error:
            continue
    return None


def _kill_during(project, stage: str, after: float = 1.0, timeout: float = 240) -> str:
    """Start `dvc repro`, SIGKILL its whole process group ``after`` s into ``stage``; what it printed."""
    proc = _repro(project)
    root, deadline = psutil.Process(proc.pid), time.monotonic() + timeout
    while _stage_process(root, stage) is None:
        assert proc.poll() is None, f"dvc repro ended before stage {stage} started:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"stage {stage} never started"
        time.sleep(0.05)
    time.sleep(after)
    os.killpg(proc.pid, signal.SIGKILL)
    output, _ = proc.communicate()
    return output


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _finals(project) -> dict:
    artifacts = project / "artifacts"
    metrics = json.loads((artifacts / "metrics.json").read_text())
    return {"model": _digest(artifacts / "model" / "model.safetensors"),
            "recovered": _digest(artifacts / "recovered" / "model.safetensors"),
            "gguf": _digest(artifacts / "export" / "model.gguf"), "metrics": metrics}


def _assert_nothing_partial(project):
    artifacts = project / "artifacts"
    for name, marker in COMPLETE.items():
        if (artifacts / name).exists():
            assert (artifacts / name / marker).exists(), f"artifacts/{name} is visible but incomplete"
    if (artifacts / "metrics.json").exists():
        json.loads((artifacts / "metrics.json").read_text())  # whole JSON, never a torn write
    for entry in (project / ".dvc" / "cache" / "files" / "md5").glob("*/*"):  # the cache: content = name
        if not entry.name.endswith(".unpacked"):
            md5 = entry.parent.name + entry.name.removesuffix(".dir")
            assert hashlib.md5(entry.read_bytes()).hexdigest() == md5, f"torn cache entry {entry}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_checkpoint, calibration_txt):
    project = make_project(tmp_path_factory.mktemp("reference"), tiny_checkpoint, calibration_txt)
    proc = _repro(project)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    return _finals(project)


def _assert_resumed_at(output: str, stage: str) -> None:
    """A run after a kill during ``stage``: the stages completed before it are not recomputed (source re-checks
    the model on every run), ``stage`` itself runs again."""
    for name in STAGES[:STAGES.index(stage)]:
        assert (f"Running stage '{name}'" if name == "source" else f"Stage '{name}' didn't change, skipping") \
            in output, output
    assert f"Running stage '{stage}'" in output, output


def test_kill_9_during_each_stage_then_rerun(uninterrupted, tmp_path, tiny_checkpoint, calibration_txt):
    """One project, one chain of runs: each run is killed during the next stage, after resuming the stage the
    previous run was killed in. After each kill nothing partial is visible; the last run completes with the
    checkpoint, recovered weights, GGUF and metrics of an uninterrupted run, byte for byte (so a resumed run is
    as reproducible as a fresh one) and no temp dir left behind."""
    project = make_project(tmp_path, tiny_checkpoint, calibration_txt)
    killed_in = None
    for stage in STAGES:
        output = _kill_during(project, stage)
        if killed_in is not None:
            _assert_resumed_at(output, killed_in)
        _assert_nothing_partial(project)
        killed_in = stage
    started = time.monotonic()
    proc = _repro(project)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    _assert_resumed_at(output, killed_in)
    assert _finals(project) == uninterrupted  # identical checkpoint, recovered weights, GGUF and metrics
    leftovers = [p.name for p in (project / "artifacts").iterdir() if p.name.startswith(".") and
                 p.name not in (".gitignore", ".state")]
    assert leftovers == [], f"temp dirs left behind: {leftovers}"
    print(f"RECOVERY {killed_in}: rerun {time.monotonic() - started:.1f} s")


def test_kill_9_mid_bonsai_resumes_from_the_last_completed_iteration(tmp_path, tiny_checkpoint, calibration_txt,
                                                                     monkeypatch):
    from tests.pipeline.test_cli import run

    project = make_project(tmp_path, tiny_checkpoint, calibration_txt)
    monkeypatch.chdir(project)  # params.yaml names the model relative to the checkout
    bonsai = ["--set", "score.method=bonsai", "--set", "score.bonsai.preset=fast", "--set", "prune.ratio=0.2",
              "--set", "score.bonsai.sub_models=8", "--set", "score.bonsai.n_windows=4"]
    params, artifacts = project / "params.yaml", project / "artifacts"
    assert run("stage", "calibrate", "--params", params, "--artifacts", artifacts).exit_code == 0
    argv = [str(Path(sys.executable).parent / "pruneflow"), "stage", "score", "--params", str(params), "--artifacts",
            str(artifacts), *bonsai]
    proc = subprocess.Popen(argv, cwd=project, env=dvc_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = artifacts / ".state"
    deadline = time.monotonic() + 300
    while not list(state.glob("*/iter_000.json")):  # one iteration completed
        assert proc.poll() is None and time.monotonic() < deadline, "Bonsai never completed an iteration"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (artifacts / "scores").exists()  # the stage's output never appears half-made
    done = sorted(p.name for p in state.glob("*/iter_*.json"))
    resumed = subprocess.run(argv, cwd=project, env=dvc_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming bonsai at iteration {len(done)}" in resumed.stderr + resumed.stdout
    fresh = tmp_path / "fresh"
    assert run("stage", "calibrate", "--params", params, "--artifacts", fresh).exit_code == 0
    assert run("stage", "score", "--params", params, "--artifacts", fresh, *bonsai).exit_code == 0
    assert json.loads((artifacts / "scores" / "plan.json").read_text()) == \
        json.loads((fresh / "scores" / "plan.json").read_text())  # the same plan as an uninterrupted run
