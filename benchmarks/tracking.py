"""Log a benchmark's results to MLflow when tracking is configured (MLFLOW_TRACKING_URI set)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from benchmarks.report import _aggregate

EXPERIMENT = "pruneflow-benchmarks"
METRICS = ("test_ppl", "test_ppl_sd", "achieved_ratio", "score_seconds", "peak_rss_mb", "decode_tok_s",
           "prefill_ms", "fidelity")


def metric_key(*parts: str) -> str:
    """An MLflow-legal metric name (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^\w\-./ ]+", "_", ".".join(parts)).strip("_")


def log_benchmark(results: Path, files: list[Path], run_name: str = "methods") -> str | None:
    """One MLflow run: machine facts as params, every configuration's numbers as metrics, ``files`` as
    artifacts. Returns the run id, or None when no tracking URI is configured."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    import mlflow

    data = json.loads(Path(results).read_text())
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"{run_name}-{data['machine']['date']}") as run:
        mlflow.log_params({f"machine.{k}": v for k, v in data["machine"].items()})
        metrics = {}
        for row in _aggregate(data["rows"]):
            model = "encoder" if "minilm" in row["model"] else "reference"
            config = (model, row["name"], row["allocation"], f"{round(row['ratio'] * 100)}pct")
            metrics |= {metric_key(*config, m): float(row[m]) for m in METRICS if row.get(m) is not None}
        mlflow.log_metrics(metrics)
        for path in files:
            if Path(path).exists():
                mlflow.log_artifact(str(path))
    return run.info.run_id
