"""Benchmark: what orchestration costs. Needs the local stack (`pruneflow up`, its exports in the environment)
and a checkout whose params.yaml the runs use. Measures, on the reference model:

1. warm re-run: `pruneflow run` with every stage cached (median of 3, after one run that fills the cache);
2. overhead: the five stages called directly (`pruneflow stage NAME`, fresh artifacts dir) vs the same params
   as an override flow run (git worktree + DVC experiment + MLflow + push), both recomputing everything;
3. sweep: a 2×2 grid (flap, wanda_sp × 0.2, 0.3) on a process work pool with 1, then 2 workers.

The overhead and sweep runs use `--set` values that keep each run short (20 recovery steps, 20 test windows,
no speed or task measurement): orchestration costs are fixed per run, not proportional to stage compute. Prints a markdown
table and writes benchmarks/orchestration.json. Usage: `python benchmarks/orchestration.py [--sweeps-only]`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHORT = ["recover.steps=20", "evaluate.speed=false", "evaluate.tasks=[]", "evaluate.max_windows=20"]
OUT = ROOT / "benchmarks" / "orchestration.json"


def timed(argv: list[str], **kwargs) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - started


def sets(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def warm_rerun() -> dict:
    timed([str(BIN / "pruneflow"), "run", "--name", "bench-fill"])
    runs = [timed([str(BIN / "pruneflow"), "run", "--name", f"bench-warm-{i}"]) for i in range(3)]
    return {"seconds": statistics.median(runs), "all": runs}


def overhead(seed: int) -> dict:
    overrides = SHORT + [f"calibrate.seed={seed}"]  # a new seed: every stage recomputes
    with tempfile.TemporaryDirectory() as tmp:
        direct = sum(timed([str(BIN / "pruneflow"), "stage", name, "--artifacts", tmp, *sets(overrides)])
                     for name in ("calibrate", "score", "prune", "recover", "evaluate"))
    flow = timed([str(BIN / "pruneflow"), "run", "--name", f"bench-cold-{seed}", *sets(overrides)])
    return {"direct_stages_s": direct, "flow_s": flow, "overhead_s": flow - direct}


def sweep(workers: int, tag: str, seed: int) -> float:
    pool = f"bench-{tag}"
    prefect = str(BIN / "prefect")
    env = {**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    subprocess.run([prefect, "work-pool", "create", pool, "--type", "process"], env=env, capture_output=True)
    timed([str(BIN / "pruneflow"), "deploy", "--pool", pool, "--name", "pruneflow"], env=env)
    procs = [subprocess.Popen([prefect, "worker", "start", "--pool", pool, "--limit", "1", "--type", "process"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
             for _ in range(workers)]
    try:
        return timed([str(BIN / "pruneflow"), "sweep", "--methods", "flap,wanda_sp", "--ratios", "0.2,0.3",
                      "--name", f"bench-sweep-{tag}", *sets(SHORT + [f"calibrate.seed={seed}"])], env=env)
    finally:
        for proc in procs:  # a worker can take minutes to shut down cleanly; it holds nothing we need
            os.killpg(proc.pid, signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def record(results: dict) -> None:
    OUT.write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    missing = [v for v in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI") if not os.environ.get(v)]
    if missing:
        raise SystemExit(f"start the stack first (`pruneflow up`) and export {', '.join(missing)}")
    if not shutil.which("git"):
        raise SystemExit("git is needed")
    tag = uuid.uuid4().hex[:6]
    seed = int(tag, 16) % 100_000 + 1  # seeds never used before: no stage can come from DVC's run-cache
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "short_runs": SHORT}
    if "--sweeps-only" in sys.argv and OUT.exists():
        results = json.loads(OUT.read_text())
    else:
        results["warm"] = warm_rerun()
        record(results)
        results["overhead"] = overhead(seed=seed)
        record(results)
    results["sweep_s"] = {}
    for n in (1, 2):  # each sweep with its own calibration seed, so both compute every stage
        results["sweep_s"][str(n)] = sweep(n, f"{tag}-{n}", seed + n)
        record(results)
    o = results["overhead"]
    print(f"| measurement ({results['machine']}) | seconds |\n|---|---|\n"
          f"| warm re-run, all stages cached (median of 3) | {results['warm']['seconds']:.1f} |\n"
          f"| five stages called directly | {o['direct_stages_s']:.1f} |\n"
          f"| the same as a flow run (worktree, experiment, MLflow, push) | {o['flow_s']:.1f} |\n"
          f"| orchestration overhead | {o['overhead_s']:.1f} |\n"
          f"| 2×2 sweep, 1 worker | {results['sweep_s']['1']:.1f} |\n"
          f"| 2×2 sweep, 2 workers | {results['sweep_s']['2']:.1f} |")


if __name__ == "__main__":
    main()
