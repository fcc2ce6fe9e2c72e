"""Benchmark: what a crash in the middle of Bonsai costs. On the reference model (params.yaml, Bonsai fast
preset, −20%): the score stage uninterrupted, then the same stage killed (SIGKILL) once half of its iterations
are done and rerun, which resumes from the last completed iteration. Checks that the resumed plan equals the
uninterrupted one, prints a markdown table and writes benchmarks/resume.json.
Usage: `python benchmarks/resume.py [--kill-after N]` (N completed iterations; default: half).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRUNEFLOW = str(Path(sys.executable).parent / "pruneflow")
BONSAI = ["--set", "score.method=bonsai", "--set", "score.bonsai.preset=fast", "--set", "prune.ratio=0.2",
          "--set", "prune.allocation=global"]
OUT = ROOT / "benchmarks" / "resume.json"


def stage(name: str, artifacts: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PRUNEFLOW_STATE_DIR": str(artifacts / ".state")}
    return subprocess.Popen([PRUNEFLOW, "stage", name, "--params", str(ROOT / "params.yaml"), "--artifacts",
                             str(artifacts), *BONSAI], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"stage failed ({proc.returncode}):\n{err[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kill-after", type=int, default=None, help="completed iterations before the kill")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pruneflow-resume-") as tmp:
        full, crashed = Path(tmp) / "full", Path(tmp) / "crashed"
        for artifacts in (full, crashed):
            finish(stage("calibrate", artifacts))
        started = time.perf_counter()
        finish(stage("score", full))
        uninterrupted = time.perf_counter() - started
        iterations = len(list((full / ".state").glob("*/iter_*.json")))
        kill_after = args.kill_after or max(1, iterations // 2)
        proc = stage("score", crashed)
        started = time.perf_counter()
        while len(list((crashed / ".state").glob("*/iter_*.json"))) < kill_after:
            if proc.poll() is not None:
                raise SystemExit("the stage ended before the kill point")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = time.perf_counter() - started
        started = time.perf_counter()
        finish(stage("score", crashed))
        resumed = time.perf_counter() - started
        same = json.loads((full / "scores" / "plan.json").read_text()) == \
            json.loads((crashed / "scores" / "plan.json").read_text())
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "iterations": iterations,
              "killed_after_iterations": kill_after, "uninterrupted_s": round(uninterrupted, 1),
              "killed_at_s": round(killed_at, 1), "resumed_s": round(resumed, 1), "same_plan": same,
              "lost_s": round(killed_at + resumed - uninterrupted, 1)}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print("| Bonsai −20% (fast) | iterations | uninterrupted | killed at | rerun | work lost | same plan |")
    print("|---|---|---|---|---|---|---|")
    print(f"| reference model | {iterations} | {uninterrupted:.1f} s | {killed_at:.1f} s (after {kill_after}) | "
          f"{resumed:.1f} s | {result['lost_s']:.1f} s | {same} |")


if __name__ == "__main__":
    main()
