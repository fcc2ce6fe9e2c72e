"""Benchmark: the same prune with candidates evaluated here (``--workers local``) and on N Ray workers.

Bonsai (``fast`` preset) and the allocation search (FLAP's plan, searched) on the reference model, from one
process: each configuration's prune is timed ``--runs`` times, interleaved (local, workers, local, …), the Ray
instance and its workers started (and their replicas loaded) before the first timed run, so the figures are the
steady state a long prune sees; their start-up is reported apart. Also checks that both give the same plan.
Writes benchmarks/fanout.json (commit, machine, command, per-run seconds, medians, ratio). Not a test. Usage:
``python benchmarks/fanout.py [--workers 2] [--runs 3] [--threads 2]``.

On one machine the workers share its cores with each other (each actor runs one thread per CPU it holds) while
the driver waits: the ratio says what fanning out costs or gains where workers compete for the same cores. On
a cluster each worker brings its own GPU or cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import ray

    from pruneflow.data import calibration as C
    from pruneflow.model import checkpoint
    from pruneflow.execution import replicas
    from pruneflow.methods.options import BonsaiParams
    from pruneflow.pipeline.params import PruneParams
    from pruneflow.prune import prune
    from pruneflow.execution.runtime import Runtime

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the local (driver) run")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "fanout.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = ROOT / "models" / "reference"
    cases = {
        "bonsai": ("bonsai", PruneParams(ratio=args.ratio), BonsaiParams(preset="fast")),
        "search": ("flap", PruneParams(ratio=args.ratio, allocation="search",
                                       search={"budget": 32, "windows": 8, "offspring": 8, "seed": 0}), None),
    }
    local, fanned = Runtime.create("cpu"), Runtime.create("cpu", workers=str(args.workers))
    started = time.perf_counter()
    ray.init(num_cpus=max(args.workers, 2), include_dashboard=False, log_to_driver=False)
    replicas.pool_for(fanned)
    ray_start = time.perf_counter() - started
    _, tokenizer, _ = checkpoint.load(source, local)
    windows, _ = C.prepare(tokenizer, "corpus", 64, 256, 0)

    def once(case: str, runtime: Runtime) -> tuple[float, str]:
        method, cfg, options = cases[case]
        model, _, spec = checkpoint.load(source, runtime, with_tokenizer=False)
        begun = time.perf_counter()
        result = prune(model, spec, method, cfg, windows, seed=0, options=options, runtime=runtime)
        return time.perf_counter() - begun, result.plan.to_json()

    results = {}
    for case in cases:
        warm = time.perf_counter()
        once(case, fanned)  # the replicas load the model and replay nothing yet: warm-up, not counted
        first = time.perf_counter() - warm
        seconds = {"local": [], "workers": []}
        plans = set()
        for _ in range(args.runs):
            for name, runtime in (("local", local), ("workers", fanned)):
                took, plan = once(case, runtime)
                seconds[name].append(round(took, 3))
                plans.add(plan)
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        results[case] = {"seconds": seconds, "median": medians, "local / workers": medians["local"] / medians["workers"],
                         "same plan": len(plans) == 1, "first fanned-out run (replicas loading)": round(first, 3)}
        print(f"{case}: local {medians['local']:.1f} s, {args.workers} workers {medians['workers']:.1f} s, "
              f"ratio {medians['local'] / medians['workers']:.2f}, same plan: {len(plans) == 1}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    report = {"commit": commit.stdout.strip(), "command": " ".join(sys.argv),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads in the driver, "
                         f"{args.workers} Ray workers of 1 CPU each, torch {torch.__version__}",
              "ray start-up and workers ready (s)": round(ray_start, 3), "ratio": args.ratio,
              "runs": args.runs, "cases": results}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    replicas.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
