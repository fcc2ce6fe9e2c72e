"""The benchmark's MLflow logging: a real local tracking store, one run with metrics and artifacts."""

import json

from benchmarks.tracking import log_benchmark, metric_key


def test_metric_keys_are_mlflow_legal():
    assert metric_key("reference", "bonsai (preset=fast, rows_per_forward=8)", "global", "20pct", "test_ppl") == \
        "reference.bonsai _preset_fast_ rows_per_forward_8_.global.20pct.test_ppl"


def test_no_tracking_uri_means_no_logging(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert log_benchmark(tmp_path / "missing.json", []) is None


def test_benchmark_is_logged_as_one_run_with_metrics_and_artifacts(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(tmp_path)  # a new experiment's artifacts default to ./mlruns: never the checkout
    row = {"model": "models/reference", "allocation": "global", "seed": 0, "achieved_ratio": 0.2,
           "score_seconds": 1.0, "peak_rss_mb": 600.0, "decode_tok_s": 200.0, "prefill_ms": 20.0}
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"machine": {"date": "2026-11-29", "cpus": 2}, "rows": [
        {**row, "method": "dense", "ratio": 0.0, "allocation": "-", "test_ppl": 59.7},
        {**row, "method": "flap", "ratio": 0.2, "test_ppl": 63.0},
        {**row, "method": "random", "ratio": 0.2, "test_ppl": 70.0},
        {**row, "method": "random", "ratio": 0.2, "seed": 1, "test_ppl": 80.0}]}))
    (tmp_path / "BENCHMARKS.md").write_text("# table\n")
    run_id = log_benchmark(results, [results, tmp_path / "BENCHMARKS.md"])
    run = mlflow.get_run(run_id)
    assert run.data.params["machine.cpus"] == "2"
    assert run.data.metrics["reference.flap.global.20pct.test_ppl"] == 63.0
    assert run.data.metrics["reference.random.global.20pct.test_ppl"] == 75.0  # mean over seeds
    assert run.data.metrics["reference.dense.-.0pct.test_ppl"] == 59.7
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert artifacts == {"results.json", "BENCHMARKS.md"}
