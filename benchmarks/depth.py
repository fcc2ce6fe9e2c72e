"""Benchmark: the depth methods — whole blocks (block_influence, angular, SLEB), sub-blocks (BlockPruner,
block_influence on sub-blocks) and layer merging (LaCo, the paper's formula and the released code's) — at 25% and
50% of the non-embedding parameters on both committed reference models; test perplexity (the packaged corpus's
test split), the achieved ratio, what was removed, seconds to prune.

Writes benchmarks/depth.json and prints the Markdown table of BENCHMARKS.md's depth section. Not a test: run it
by hand, alone on the machine, `python benchmarks/depth.py` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "depth.json"
# (label, method, units, options of score.<method>)
CONFIGS = [
    ("block_influence", "block_influence", ["layers"], {}),
    ("angular", "angular", ["layers"], {}),
    ("sleb", "sleb", ["layers"], {}),
    ("block_influence (sub-blocks)", "block_influence", ["subblocks"], {}),
    ("blockpruner", "blockpruner", ["subblocks"], {}),
    ("laco", "laco", ["merged_layers"], {}),
    ("laco (paper's formula)", "laco", ["merged_layers"], {"formula": "paper"}),
]


def removed(plan) -> str:
    """What a plan took away, in words."""
    if plan.kept.get("merged_layers"):
        return "merges " + ", ".join(f"{b}+{m}" for b, m in plan.kept["merged_layers"]["merges"]) or "none"
    if "subblocks" in plan.units:
        return ", ".join(f"{'attn' if not layer.kept_heads else 'mlp'} {i}" if bool(layer.kept_heads) !=
                         bool(layer.kept_channels) else f"block {i}"
                         for i, layer in enumerate(plan.layers) if not layer.kept_heads or not layer.kept_channels)
    n = len(plan.layers)
    return "blocks " + ", ".join(str(i) for i in range(n) if plan.kept_layers is not None and i not in plan.kept_layers)


def run(model_name: str, threads: int) -> list[dict]:
    import torch

    from pruneflow.data import calibration as C
    from pruneflow.model import checkpoint
    from pruneflow.data import corpus
    from pruneflow.evaluation.evaluate import measure
    from pruneflow.methods import METHODS
    from pruneflow.pipeline.params import PruneParams
    from pruneflow.prune import prune
    from pruneflow.execution.runtime import Runtime

    torch.set_num_threads(threads)
    runtime = Runtime.create("cpu", "auto")
    path = ROOT / "models" / model_name
    test_docs = corpus.load_split("test")
    rows = []
    model, tokenizer, spec = checkpoint.load(path, runtime)
    stream = C.token_stream(tokenizer, test_docs)
    rows.append({"model": model_name, "config": "dense", "ratio": 0.0, "achieved_ratio": 0.0, "removed": "",
                 "test_ppl": measure(model, tokenizer, spec, None, stream, speed=False, runtime=runtime)["test_ppl"]})
    windows, _ = C.prepare(tokenizer, "corpus", 64, 256, 0, getattr(model.config, "max_position_embeddings", None))
    for ratio in (0.25, 0.5):
        for label, method, units, options in CONFIGS:
            model, tokenizer, spec = checkpoint.load(path, runtime)
            entry = METHODS[method]
            started = time.perf_counter()
            result = prune(model, spec, method, PruneParams(ratio=ratio, units=units), windows, runtime=runtime,
                           options=entry.options(**options) if entry.options else None)
            seconds = time.perf_counter() - started
            row = {"model": model_name, "config": label, "method": method, "units": units, "options": options,
                   "ratio": ratio, "achieved_ratio": result.plan.params["achieved_ratio"],
                   "removed": removed(result.plan), "prune_seconds": seconds,
                   "test_ppl": measure(model, tokenizer, spec, None, stream, speed=False, runtime=runtime)["test_ppl"]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | method | target | achieved | test ppl | removed | prune s |", "|---|---|---:|---:|---:|---|---:|"]
    for r in rows:
        seconds = f"{r['prune_seconds']:.1f}" if "prune_seconds" in r else "–"
        lines.append(f"| {r['model']} | {r['config']} | {r['ratio']:.0%} | {r['achieved_ratio']:.1%} | "
                     f"{r['test_ppl']:.1f} | {r['removed']} | {seconds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["reference", "reference-deep"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="print the table of depth.json, measure nothing")
    args = parser.parse_args()
    if args.report:
        print(table(json.loads(OUT.read_text())["rows"]))
        return
    rows = [row for model in args.models for row in run(model, args.threads)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    machine = {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads,
               "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "commit": commit.strip(),
               "command": "python benchmarks/depth.py " + " ".join(sys.argv[1:])}
    OUT.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
