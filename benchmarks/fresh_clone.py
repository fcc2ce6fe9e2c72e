"""Benchmark: the main job as a new user runs it — `git clone` of this checkout's HEAD, then `pruneflow run` in
the clone (params.yaml as committed, Prefect's temporary server, MLflow in the clone's mlflow.db) — timed as a
whole, with the peak resident memory of its largest process and each stage's seconds from the clone's
artifacts/resources/. Uses this environment's installed pruneflow (same commit: run it from a clean checkout).
Writes ``benchmarks/fresh_clone.json`` (with its commit and command). Run it by hand, alone on the machine:
`python benchmarks/fresh_clone.py` (~10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "fresh_clone.json"


def run(threads: int) -> dict:
    from pruneflow.pipeline.graph import OUTPUTS, RESOURCES, STAGES

    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                      text=True).stdout.strip():
        raise SystemExit("the checkout has uncommitted changes: the clone would not run the code installed here")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(OMP_NUM_THREADS=str(threads))
    pruneflow = str(Path(sys.executable).parent / "pruneflow")
    with tempfile.TemporaryDirectory(prefix="pruneflow-fresh-") as tmp:
        clone = Path(tmp) / "pruneflow"
        started = time.perf_counter()
        subprocess.run(["git", "clone", "-q", "--no-local", str(ROOT), str(clone)], check=True)
        cloned = time.perf_counter() - started
        proc = subprocess.run([pruneflow, "run"], cwd=clone, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"pruneflow run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest waited-for process
        artifacts = clone / "artifacts"
        metrics = json.loads((artifacts / OUTPUTS["evaluate"]).read_text())
        stage_seconds = {s: json.loads((artifacts / RESOURCES / f"{s}.json").read_text())["seconds"] for s in STAGES}
        shutil.rmtree(clone, ignore_errors=True)
    return {"seconds": seconds, "clone_seconds": cloned, "peak_rss_bytes": peak, "stage_seconds": stage_seconds,
            "test_ppl": {k: metrics[k]["test_ppl"] for k in ("dense", "pruned", "recovered") if k in metrics},
            "gates_passed": metrics["gates_passed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    date = time.strftime("%Y-%m-%d")
    row = run(args.threads)
    from benchmarks import write_results

    write_results(args.out, [row], args.threads, date)
    print(f"fresh clone → pruneflow run: {summary(row)}")


def summary(row: dict) -> str:
    """How README quotes the result: ``5 min 28 s (1.70 GB peak RSS)``."""
    minutes, seconds = divmod(round(row["seconds"]), 60)
    return f"{minutes} min {seconds} s ({row['peak_rss_bytes'] / 1e9:.2f} GB peak RSS)"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
