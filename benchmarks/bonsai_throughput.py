"""Benchmark: seconds per Bonsai sub-model, masks in the batch dimension vs one sub-model per forward pass.

Same masks, same windows, same model (the reference model); only the number of (sub-model, window) rows per
forward pass changes. ``rows = n_windows`` is the naive loop (one mask per forward). Prints a markdown table and
writes benchmarks/bonsai_throughput.json (with the commit and command); not a test. Usage:
`python benchmarks/bonsai_throughput.py [--sub-models 32] [--n-windows 8] [--threads 2]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from pruneflow.data import calibration as C
    from pruneflow.model import checkpoint
    from pruneflow.methods import bonsai
    from pruneflow.execution.runtime import Runtime

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sub-models", type=int, default=32)
    parser.add_argument("--n-windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bonsai_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runtime = Runtime.create(args.device)
    model, tokenizer, spec = checkpoint.load(ROOT / "models" / "reference", runtime)
    windows, _ = C.prepare(tokenizer, "corpus", args.n_windows, args.seqlen, 0)
    modules = bonsai.layout(model, spec, ("channels", "heads"), "auto")
    priors = bonsai.unit_priors(model, spec, windows, runtime, modules, "wanda_sp", 0)
    keep, _ = bonsai.sample_masks(modules, priors, 0.05, args.sub_models, "fixed", torch.Generator().manual_seed(0))
    bonsai.submodel_losses(model, spec, modules, keep[:2], windows, args.n_windows, runtime)  # warm-up
    print(f"{args.sub_models} sub-models × {args.n_windows} windows × {args.seqlen} tokens on {runtime.device} "
          f"({platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__})\n")
    print("| rows per forward | sub-models per forward | s / sub-model | vs naive |\n|---:|---:|---:|---:|")
    baseline, reference, results = None, None, []
    for multiple in args.multiples:
        rows = multiple * args.n_windows
        runtime.synchronize()
        started = time.perf_counter()
        losses = bonsai.submodel_losses(model, spec, modules, keep, windows, rows, runtime)
        runtime.synchronize()
        per_model = (time.perf_counter() - started) / args.sub_models
        baseline = baseline or per_model
        reference = losses if reference is None else reference
        drift = float((losses - reference).abs().max())
        print(f"| {rows} | {multiple} | {per_model:.3f} | {baseline / per_model:.2f}× (max loss diff {drift:.1e}) |")
        results.append({"rows_per_forward": rows, "sub_models_per_forward": multiple,
                        "seconds_per_sub_model": per_model, "max_loss_diff": drift})
    from benchmarks import provenance

    args.out.write_text(json.dumps({
        "machine": {"device": str(runtime.device), "processor": platform.processor() or platform.machine(),
                    "threads": args.threads, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")},
        **provenance(), "sub_models": args.sub_models, "n_windows": args.n_windows, "seqlen": args.seqlen, "rows": results},
        indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
