"""Benchmark: how long the CLI takes to answer. Prints a markdown table and writes benchmarks/startup.json.

1. `pruneflow --help`, every command's `--help`, `pruneflow methods` (median of 5 processes each);
2. a warm re-run of the main job: `pruneflow run` with every stage up to date, in a clone of this checkout
   whose cache a first `pruneflow run` filled (~6 min on 2 cores, done once; the clone is kept in --work),
   median of 5, with Prefect's temporary server (no PREFECT_API_URL) and, when PREFECT_API_URL is set (e.g.
   `pruneflow up`'s exports), against that server too.

Usage: `python benchmarks/startup.py [--work DIR] [--runs N]`. Nothing else may run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "pruneflow")
OUT = ROOT / "benchmarks" / "startup.json"
COMMANDS = [[], ["prune"], ["evaluate"], ["demo"], ["stage"], ["run"], ["sweep"], ["report"], ["up"], ["status"],
            ["down"], ["serve"], ["deploy"], ["methods"], ["reference"], ["reference", "build"], ["corpus"]]


def seconds(argv: list[str], runs: int, cwd: Path = ROOT, env: dict | None = None) -> dict:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def filled_clone(work: Path) -> Path:
    clone = work / "checkout"
    if not (clone / "dvc.lock").exists():
        if not clone.exists():
            subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        print("filling the clone's cache with a first `pruneflow run` (minutes)...", file=sys.stderr)
        seconds([CLI, "run", "--name", "bench-fill"], 1, cwd=clone, env=_without_prefect_api())
    return clone


def _without_prefect_api() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "pruneflow-bench" / "startup")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    from benchmarks import provenance

    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
               "date": time.strftime("%Y-%m-%d"), "runs": args.runs, "help": {},
               "commit": provenance()["commit"]}
    for command in COMMANDS:
        results["help"][" ".join(command) or "(none)"] = seconds([CLI, *command, "--help"], args.runs)
    results["methods"] = seconds([CLI, "methods"], args.runs)
    clone = filled_clone(args.work)
    results["warm_rerun_temporary_server"] = seconds([CLI, "run"], args.runs, cwd=clone, env=_without_prefect_api())
    if os.environ.get("PREFECT_API_URL"):
        results["warm_rerun_running_server"] = seconds([CLI, "run"], args.runs, cwd=clone)
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    slowest = max(results["help"].items(), key=lambda kv: kv[1]["median"])
    rows = [("`pruneflow --help`", results["help"]["(none)"]),
            (f"slowest command `--help` (`{slowest[0]}`)", slowest[1]),
            ("`pruneflow methods`", results["methods"]),
            ("`pruneflow run`, all stages up to date, Prefect's temporary server",
             results["warm_rerun_temporary_server"])]
    if "warm_rerun_running_server" in results:
        rows.append(("the same against a running Prefect server", results["warm_rerun_running_server"]))
    print(f"| command ({results['machine']}; median of {args.runs}) | seconds | min–max |\n|---|---:|---:|")
    for label, t in rows:
        print(f"| {label} | {t['median']:.2f} | {t['min']:.2f}–{t['max']:.2f} |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
