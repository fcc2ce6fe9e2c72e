"""Benchmark: the main job (params.yaml's stages: source → calibrate → score → prune → recover → evaluate) on
each committed reference model, with the stage functions the pipeline runs (no Prefect, DVC or MLflow), so
its numbers are the main job's without the orchestration.

Each ``--models`` entry × each ``--variant`` (a name and ``section.key=value`` overrides of params.yaml; the
first, ``defaults``, has none) runs in its own temporary artifacts directory; a variant that only changes
``recover.*`` re-uses the pruned model of ``defaults``. Writes ``benchmarks/mainjob.json`` (each row records
its commit and command) and prints a markdown table. Not a test: run it by hand,
`python benchmarks/mainjob.py` (about 6 minutes per model and variant on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "mainjob.json"


def run_model(model: str, variants: list[tuple[str, list[str]]], params_file: Path, threads: int) -> list[dict]:
    import torch

    from pruneflow.pipeline import stages
    from pruneflow.pipeline.graph import OUTPUTS, RESOURCES, STAGES
    from pruneflow.pipeline.params import load_params

    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pruneflow-mainjob-") as tmp:
        base = Path(tmp) / "defaults"
        for name, overrides in variants:
            params = load_params(params_file, [f"model={ROOT / 'models' / model}", *overrides])
            root = Path(tmp) / name
            todo = STAGES
            if name != "defaults" and all(o.startswith("recover.") for o in overrides) and base.exists():
                shutil.copytree(base, root)  # same pruned model: only recover and evaluate run again
                todo = STAGES[STAGES.index("recover"):]
            for stage in todo:
                print(f"{model} {name}: {stage}", file=sys.stderr, flush=True)
                stages.run(stage, params, root)
            metrics = json.loads((root / OUTPUTS["evaluate"]).read_text())
            resources = {s: json.loads((root / RESOURCES / f"{s}.json").read_text()) for s in STAGES}
            plan = json.loads((root / OUTPUTS["prune"] / "plan.json").read_text())
            rows.append({"model": model, "variant": name, "overrides": overrides,
                         "method": plan["method"], "allocation": plan.get("allocation"),
                         "reconstruct": plan.get("reconstruct"), "ratio": params.prune.ratio,
                         "achieved_ratio": metrics["achieved_ratio"],
                         "seconds": {s: r["seconds"] for s, r in resources.items()},
                         **{k: metrics[k] for k in ("dense", "pruned", "recovered") if k in metrics},
                         "gates_passed": metrics["gates_passed"]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | variant | method · allocation · reconstruct | achieved | test ppl dense / pruned / recovered "
             "| tasks (dense / pruned / recovered) | prune s | recover s | gates |",
             "|---|---|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        names = [k for k in ("dense", "pruned", "recovered") if k in r]
        ppl = " / ".join(f"{r[k]['test_ppl']:.2f}" for k in names)
        tasks = "; ".join(f"{t} " + " / ".join(f"{r[k]['tasks'][t]:.3f}" for k in names)
                          for t in sorted(r["dense"].get("tasks", {})))
        seconds = r["seconds"]
        lines.append(f"| {r['model']} | {r['variant']} | {r['method']} · {r['allocation']} · {r['reconstruct']} | "
                     f"{r['achieved_ratio']:.1%} | {ppl} | {tasks or '–'} | "
                     f"{seconds['score'] + seconds['prune']:.0f} | {seconds['recover']:.0f} | "
                     f"{'pass' if r['gates_passed'] else 'fail'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["reference", "reference-deep"])
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                        help="an extra configuration: its name, then params overrides (repeatable)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="print the table of --out's rows and exit (no runs)")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())["rows"]))
        return
    variants = [("defaults", [])] + [(v[0], v[1:]) for v in args.variant]
    started = time.strftime("%Y-%m-%d")
    rows = [row for model in args.models for row in run_model(model, variants, args.params, args.threads)]
    from benchmarks import write_results

    write_results(args.out, rows, args.threads, started)
    print(table(rows))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
