"""`pruneflow report`: the comparison of stored runs, from local metrics.json files or from MLflow."""

import json

import pytest

from tests.pipeline.test_cli import run


def metrics(method: str, ratio: float, ppl: float, recovered_ppl: float | None = None) -> dict:
    dense = {"params": 1000, "non_embedding_params": 800, "size_mb": 4.0, "test_ppl": 50.0,
             "tasks": {"pruneflow_word_order": 0.8}}
    pruned = {"params": 1000 - int(800 * ratio), "non_embedding_params": int(800 * (1 - ratio)), "size_mb": 3.0,
              "test_ppl": ppl, "tasks": {"pruneflow_word_order": 0.7}}
    out = {"dense": dense, "pruned": pruned, "method": method, "achieved_ratio": ratio, "final": "pruned",
           "gates_passed": ppl / 50.0 <= 1.5}
    if recovered_ppl:
        out |= {"recovered": {**pruned, "test_ppl": recovered_ppl}, "final": "recovered"}
    return out


@pytest.fixture
def two_runs(tmp_path):
    paths = []
    for name, m in {"flap-0.3": metrics("flap", 0.3, 70.0, 62.0), "bonsai-0.5": metrics("bonsai", 0.5, 90.0)}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
        paths.append(tmp_path / name)
    return paths


def test_report_renders_a_table_and_plots_from_two_local_runs(two_runs, tmp_path):
    out = tmp_path / "cmp"
    result = run("report", *two_runs, "--out", out)
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert text.count("| dense |") == 2  # the shared dense model once in each table (models, tasks)
    assert "flap-0.3 recovered" in text and "bonsai-0.5 pruned" in text and "| pass |" in text
    assert "pruneflow_word_order" in text  # the task table
    png = (out / "ppl_vs_params.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_reads_runs_from_mlflow(two_runs, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("pruneflow", artifact_location=(tmp_path / "art").as_uri())
    for path in two_runs:
        run_ = client.create_run(experiment, run_name=path.name)
        client.log_artifact(run_.info.run_id, str(path / "metrics.json"))
        client.set_terminated(run_.info.run_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = run("report", "flap-0.3", "bonsai-0.5", "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    assert "flap-0.3 recovered" in (tmp_path / "cmp" / "report.md").read_text()
    missing = run("report", "nope", "--out", tmp_path / "cmp2")
    assert missing.exit_code == 2 and "no finished pipeline run named nope" in missing.output
    assert not (tmp_path / "cmp2").exists()


def test_report_says_which_mlflow_runs_it_skips_or_cannot_read(two_runs, tmp_path, monkeypatch):
    """A run that never reached evaluate is skipped and named (an error when asked for by name); a run whose
    metrics cannot be read fails the report with the run and the cause, never a silent skip."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("pruneflow", artifact_location=(tmp_path / "art").as_uri())
    ids = {}
    for path in two_runs:
        run_ = client.create_run(experiment, run_name=path.name)
        client.log_artifact(run_.info.run_id, str(path / "metrics.json"))
        client.set_terminated(run_.info.run_id)
        ids[path.name] = run_.info.run_id
    early = client.create_run(experiment, run_name="died-in-score")
    client.set_terminated(early.info.run_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    every = run("report", "--out", tmp_path / "all")
    assert every.exit_code == 0, every.output
    assert "skipped 1 run(s) that never reached the evaluate stage (no metrics.json): died-in-score" in every.output
    named = run("report", "died-in-score", "flap-0.3", "--out", tmp_path / "named")
    assert named.exit_code == 2 and "died-in-score" in named.output and "never reached the evaluate" in named.output
    assert not (tmp_path / "named").exists()

    (stored,) = (tmp_path / "art").glob(f"{ids['flap-0.3']}/artifacts/metrics.json")
    stored.write_text("{truncated")
    broken = run("report", "--out", tmp_path / "broken")
    assert broken.exit_code == 2 and f"MLflow run flap-0.3 ({ids['flap-0.3']})" in broken.output
    assert "not valid JSON" in broken.output and not (tmp_path / "broken").exists()


def test_report_without_a_store_says_so_and_creates_none(tmp_path, monkeypatch):
    """No MLFLOW_TRACKING_URI and no mlflow.db in the checkout: a name that is not a file is neither a file nor a
    run anywhere; the report says so and leaves no empty store behind (opening one creates it)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    result = run("report", "nothing_here", "--out", tmp_path / "cmp")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "nothing_here: no such metrics.json file or directory, and no MLflow store at" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == []
