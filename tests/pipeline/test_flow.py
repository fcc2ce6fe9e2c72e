"""The Prefect flow over dvc.yaml's stages, against a real (test-harness) Prefect API and real DVC/git."""

import json
from pathlib import Path

import pytest

from tests.conftest import sh as _sh
from tests.pipeline.test_cli import run


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_flow_runs_the_stages_then_serves_them_from_cache_and_isolates_overrides(prefect_api, project):
    from pruneflow.flows.pipeline import pipeline
    from pruneflow.pipeline.params import load_params
    from pruneflow.tasks.stage import dvc_bin

    params = load_params(project / "params.yaml")
    first = pipeline(params=params, repo=str(project), run_name="first")
    assert [(s["stage"], s["cached"]) for s in first["stages"]] == [
        ("source", False), ("calibrate", False), ("score", False), ("prune", False), ("recover", False),
        ("evaluate", False), ("export", False)]
    assert first["experiment"] is None and first["metrics"]["achieved_ratio"] == pytest.approx(0.25, abs=0.02)
    assert all(s["outs"] for s in first["stages"][:5])  # dvc.lock hashes of every output
    assert first["stages"][6]["outs"]["artifacts/export"].endswith(".dir")  # DVC tracks the exported GGUF
    assert first["metrics"]["final"] == "recovered" and "test_ppl" in first["metrics"]["recovered"]

    _check_tracking(project, first)

    second = pipeline(params=params, repo=str(project), run_name="second")
    # the model is re-checked (its fingerprint equals artifacts/source.json) and DVC's status lists nothing
    # else: no stage command runs
    assert [s["cached"] for s in second["stages"]] == [True] * 7

    metrics = (project / "artifacts" / "metrics.json").read_bytes()
    (project / "artifacts" / "metrics.json").unlink()  # an output gone: DVC's status says so, DVC restores it
    restored = pipeline(params=params, repo=str(project), run_name="restored")
    assert [s["cached"] for s in restored["stages"]] == [True] * 7
    assert (project / "artifacts" / "metrics.json").read_bytes() == metrics

    users_files = {p: p.read_bytes() for p in (project / "params.yaml", project / "dvc.lock",
                                                 project / "artifacts" / "metrics.json")}
    fewer = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"max_windows": 2})})
    third = pipeline(params=fewer, repo=str(project), run_name="fewer-windows")
    # a fresh worktree has no outputs: the source stage runs, the rest come from DVC's cache, evaluate re-ran
    assert [s["cached"] for s in third["stages"]] == [False, True, True, True, True, False, True]
    assert third["experiment"] == "fewer-windows"
    assert {p: p.read_bytes() for p in users_files} == users_files  # the checkout is untouched
    dvc = dvc_bin()
    experiment = _find(json.loads(_sh([dvc, "exp", "show", "--json"], project)), "fewer-windows")
    assert experiment is not None, "the override run is not in `dvc exp show`"
    assert _values(experiment, "max_windows") == [2]  # its params
    assert _values(experiment, "achieved_ratio") == [pytest.approx(0.25, abs=0.02)]  # its metrics
    assert _sh(["git", "worktree", "list"], project).count("\n") == 1  # the run's worktree is gone


def _check_tracking(project, result):
    """MLflow (local SQLite store in the checkout): parent run, a nested run per stage, the model registered."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["prune.ratio"] == "0.25"
    assert parent.data.tags["pruneflow.code_version"] and parent.data.tags["prefect.flow_run_id"]
    assert parent.data.metrics["achieved_ratio"] == pytest.approx(result["metrics"]["achieved_ratio"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["calibrate", "evaluate", "export", "prune", "recover",
                                                          "score", "source"]
    score_run = next(r for r in children if r.info.run_name == "score")
    assert score_run.data.metrics["peak_memory_mb"] > 1  # from artifacts/resources/score.json
    recover_run = next(r for r in children if r.info.run_name == "recover")
    curve = client.get_metric_history(recover_run.info.run_id, "recover.loss")
    assert [m.step for m in curve] == [0, 1, 2]  # the loss curve, one point per step
    prune_run = next(r for r in children if r.info.run_name == "prune")
    assert any(k.startswith("dvc.out.artifacts/model") for k in prune_run.data.tags)
    model = result["model"]
    vanilla = json.loads((project / "artifacts" / "recovered" / "pruneflow.json").read_text())["vanilla"]
    assert model["flavor"] == ("transformers" if vanilla else "artifacts")
    assert str(client.get_model_version_by_alias(model["name"], "candidate").version) == model["version"]
    if result["metrics"]["gates_passed"]:
        assert str(client.get_model_version_by_alias(model["name"], "champion").version) == model["version"]
    else:
        assert not model["champion"]
    # the exported GGUF is logged with the registered version, which names it, byte-identical to DVC's copy
    version = client.get_model_version(model["name"], model["version"])
    assert model["exports"] == {"gguf": f"runs:/{parent.info.run_id}/export/model.gguf"}
    assert version.tags["pruneflow.model.export.gguf"] == model["exports"]["gguf"]
    import mlflow

    logged = mlflow.artifacts.download_artifacts(model["exports"]["gguf"], tracking_uri=client.tracking_uri,
                                                 dst_path=str(project / ".." / "downloaded"))
    assert Path(logged).read_bytes() == (project / "artifacts" / "export" / "model.gguf").read_bytes()


def _find(tree, name):
    """The `dvc exp show --json` entry named ``name``."""
    if isinstance(tree, dict):
        if tree.get("name") == name:
            return tree
        tree = list(tree.values())
    if isinstance(tree, list):
        for item in tree:
            found = _find(item, name)
            if found is not None:
                return found
    return None


def _values(tree, key):
    if isinstance(tree, dict):
        return [tree[key]] if key in tree else [v for item in tree.values() for v in _values(item, key)]
    if isinstance(tree, list):
        return [v for item in tree for v in _values(item, key)]
    return []


def test_a_failing_stage_fails_the_run_with_its_own_message(prefect_api, project, tmp_path):
    empty = tmp_path / "empty.txt"  # there, so the preflight lets it through; no window in it, so calibrate fails
    empty.write_text("")
    result = run("run", "--params", project / "params.yaml", "--set", f"calibrate.source={empty}")
    assert result.exit_code == 2
    assert "stage calibrate failed" in result.output and "empty.txt" in result.output
    assert "Traceback" not in result.output  # Prefect's engine logged one; the message is the whole story
    # an override run works in a worktree: the checkout gets nothing but the shared state (file digests)
    assert [p.name for p in (project / "artifacts").iterdir()] == [".state"]
    assert _sh(["git", "worktree", "list"], project).count("\n") == 1


def test_what_the_preflight_refuses_starts_no_flow_run(prefect_api, project):
    """A calibration file that is not there (relative: to the checkout) is refused by `pruneflow run` itself —
    no flow run, no worktree, no stage — where it used to fail the calibrate stage with Prefect's traceback."""
    before = sorted(p.name for p in project.iterdir())
    result = run("run", "--params", project / "params.yaml", "--set", "calibrate.source=missing.txt")
    assert result.exit_code == 2, result.output
    assert f"calibrate.source '{project / 'missing.txt'}' not found" in " ".join(result.output.split())
    assert "Traceback" not in result.output and "stage calibrate" not in result.output
    assert sorted(p.name for p in project.iterdir()) == before
    assert _sh(["git", "worktree", "list"], project).count("\n") == 1


def test_the_flow_prunes_a_bf16_hub_model_from_the_local_cache(prefect_api, tmp_path, bf16_checkpoint,
                                                               calibration_txt, monkeypatch):
    """`model: ORG/NAME` in params.yaml, resolved offline from a real cache layout: bf16 in, bf16 and smaller
    out, loadable with transformers; DVC tracks the hub commit through the source stage's record."""
    import huggingface_hub.constants as constants
    import yaml
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from pruneflow.flows.pipeline import pipeline
    from pruneflow.evaluation.evaluate import size_on_disk
    from pruneflow.pipeline.params import load_params
    from tests.conftest import hub_cache, make_project

    cache = tmp_path / "hf-cache"
    commit = hub_cache(cache, "org/tiny-bf16", bf16_checkpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # the stage processes
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # this one
    project = make_project(tmp_path, bf16_checkpoint, calibration_txt)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"] = "org/tiny-bf16"
    params["recover"]["enabled"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _sh(["git", "commit", "-qam", "a hub model"], project)
    result = pipeline(params=load_params(project / "params.yaml"), repo=str(project), run_name="hub")
    artifacts = project / "artifacts"
    assert json.loads((artifacts / "source.json").read_text())["commit"] == commit
    with safe_open(next((artifacts / "model").glob("*.safetensors")), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    snapshot = cache / "models--org--tiny-bf16" / "snapshots" / commit
    assert size_on_disk(artifacts / "model") < size_on_disk(snapshot)
    loaded = AutoModelForCausalLM.from_pretrained(artifacts / "model", trust_remote_code=True)
    assert str(loaded.dtype) == "torch.bfloat16"
    assert result["metrics"]["final"] == "pruned" and result["metrics"]["pruned"]["test_ppl"] > 0
