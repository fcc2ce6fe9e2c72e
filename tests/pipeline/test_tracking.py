"""Model registration: transformers flavor for vanilla checkpoints, aliases moved only when gates pass."""

import json

import pytest
import torch

from pruneflow.model import arch as A
from pruneflow.model import checkpoint
from pruneflow.pipeline.params import PruneParams
from pruneflow.prune import prune
from tests.conftest import tiny_causal_lm


def _workspace(tmp_path, tokenizer, allocation: str):
    model = tiny_causal_lm(vocab_size=len(tokenizer))
    spec = A.arch_for("llama")
    windows = torch.randint(0, len(tokenizer), (4, 16), generator=torch.Generator().manual_seed(0))
    prune(model, spec, "wanda_sp", PruneParams(ratio=0.3, allocation=allocation, head_mode="group"), windows)
    info = checkpoint.save(model, tokenizer, tmp_path / "artifacts" / "model", spec)
    assert info["vanilla"] == (allocation == "uniform")
    return tmp_path


@pytest.fixture
def workspace(tmp_path, tiny_tokenizer):
    return _workspace(tmp_path, tiny_tokenizer, "uniform")


def _metrics(workspace, passed: bool):
    (workspace / "artifacts" / "metrics.json").write_text(json.dumps(
        {"achieved_ratio": 0.3, "ppl_ratio": 1.1 if passed else 3.0, "gates_passed": passed}))


def test_gates_decide_the_champion_alias(workspace, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from prefect.logging import disable_run_logger

    from pruneflow.tasks.tracking import register_model, start_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    with disable_run_logger():
        _metrics(workspace, passed=True)
        first = register_model.fn(str(repo), start_run.fn(str(repo), {"prune": {"ratio": 0.3}}, "a", {}),
                                  str(workspace), "tiny-pruned")
        _metrics(workspace, passed=False)
        second = register_model.fn(str(repo), start_run.fn(str(repo), {"prune": {"ratio": 0.3}}, "b", {}),
                                   str(workspace), "tiny-pruned")
    assert first["flavor"] == "transformers" and first["champion"] and not second["champion"]
    assert str(client.get_model_version_by_alias("tiny-pruned", "candidate").version) == second["version"]
    assert str(client.get_model_version_by_alias("tiny-pruned", "champion").version) == first["version"]


def test_a_per_layer_checkpoint_is_registered_as_its_directory(tmp_path, tiny_tokenizer, monkeypatch):
    from mlflow import MlflowClient
    from prefect.logging import disable_run_logger

    from pruneflow.tasks.tracking import register_model, start_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workspace = _workspace(tmp_path / "ws", tiny_tokenizer, "global")
    _metrics(workspace, passed=True)
    repo = tmp_path / "repo"
    repo.mkdir()
    with disable_run_logger():
        result = register_model.fn(str(repo), start_run.fn(str(repo), {}, "a", {}), str(workspace), "tiny-pl")
    assert result["flavor"] == "artifacts" and result["champion"]
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    version = client.get_model_version_by_alias("tiny-pl", "champion")
    files = {f.path for f in client.list_artifacts(version.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/modeling_pruneflow.py"} <= files


def test_the_same_model_is_registered_once(workspace, tmp_path, monkeypatch):
    """A cached re-run (same dvc.lock hash for the model) points the aliases at the existing version."""
    import yaml
    from prefect.logging import disable_run_logger

    from pruneflow.tasks.tracking import register_model, start_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    _metrics(workspace, passed=True)

    def register(md5):
        (workspace / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"prune": {
            "outs": [{"path": "artifacts/model", "md5": md5}]}}}))
        with disable_run_logger():
            return register_model.fn(str(repo), start_run.fn(str(repo), {}, "r", {}), str(workspace), "tiny-once")

    first, again, changed = register("aaa.dir"), register("aaa.dir"), register("bbb.dir")
    assert first["version"] == again["version"] != changed["version"]


def test_the_exported_gguf_is_logged_with_the_registered_version(workspace, tmp_path, monkeypatch):
    """The export stage's GGUF (and its q8_0 copy) goes to MLflow beside the version it was made from; the
    version's tags name them.
    A re-registration of the same model (a cached re-run) keeps that tag and logs nothing again."""
    import yaml
    from mlflow import MlflowClient
    from prefect.logging import disable_run_logger

    from pruneflow.pipeline import stages
    from pruneflow.pipeline.params import Params
    from pruneflow.execution.runtime import Runtime
    from pruneflow.tasks.tracking import register_model, start_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    artifacts = workspace / "artifacts"
    (artifacts / "recovered").mkdir()
    (artifacts / "recovered" / "recovery.json").write_text('{"enabled": false}')  # recovery off: the pruned model
    stages.export(Params(export={"formats": ["gguf"], "quantize": ["q8_0"]}), artifacts, Runtime.create("cpu"))
    _metrics(workspace, passed=True)
    (workspace / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"prune": {
        "outs": [{"path": "artifacts/model", "md5": "aaa.dir"}]}}}))
    repo = tmp_path / "repo"
    repo.mkdir()
    with disable_run_logger():
        first_run = start_run.fn(str(repo), {}, "a", {})
        first = register_model.fn(str(repo), first_run, str(workspace), "tiny-gguf")
        again = register_model.fn(str(repo), start_run.fn(str(repo), {}, "b", {}), str(workspace), "tiny-gguf")
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    uri, q8 = f"runs:/{first_run}/export/model.gguf", f"runs:/{first_run}/export/model-q8_0.gguf"
    assert first["exports"] == again["exports"] == {"gguf": uri, "gguf_q8_0": q8}
    assert first["version"] == again["version"]
    tags = client.get_model_version("tiny-gguf", first["version"]).tags
    assert (tags["pruneflow.model.export.gguf"], tags["pruneflow.model.export.gguf_q8_0"]) == (uri, q8)
    assert [f.path for f in client.list_artifacts(first_run, "export")] == ["export/model-q8_0.gguf",
                                                                           "export/model.gguf"]
    logged = client.download_artifacts(first_run, "export/model.gguf", str(tmp_path))
    assert open(logged, "rb").read() == (artifacts / "export" / "model.gguf").read_bytes()


def test_an_alias_set_by_two_runs_at_once_is_retried_until_the_store_takes_it(tmp_path):
    """Two sweep points registering together: the store refuses the second insert of the same alias (a unique
    constraint); setting it again updates the row. Anything else is raised at once."""
    from mlflow.exceptions import MlflowException

    from pruneflow.tasks.tracking import set_alias

    class Store:
        def __init__(self, failures):
            self.failures, self.calls = list(failures), 0

        def set_registered_model_alias(self, name, alias, version):
            self.calls += 1
            if self.failures:
                raise self.failures.pop(0)

    raced = Store([MlflowException("BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: "
                                   "registered_model_aliases.workspace")])
    set_alias(raced, "m", "champion", "2")
    assert raced.calls == 2
    broken = Store([MlflowException("PERMISSION_DENIED")])
    with pytest.raises(MlflowException, match="PERMISSION_DENIED"):
        set_alias(broken, "m", "champion", "2")
    assert broken.calls == 1
