"""Expert pruning on the two MoE benchmark models: test perplexity after removing experts, per method.

    python benchmarks/experts.py [--threads 2] [--out benchmarks/experts.json] [--build]

Models: ``pruneflow reference build --config moe`` (Qwen3-MoE, 4 layers, 8 experts, top-2) and ``--config
moe-mixtral`` (Mixtral, 6 layers, 16 experts, top-4, tied embeddings), both trained on the packaged corpus
(``--build`` trains any that is missing, ~8 min each on one thread). For each, 1/4 and 1/2 of every layer's
experts are removed by ``router_weighted`` (uniform and global allocation), ``expert_drop`` (uniform; every
combination) and a seeded random choice of the same counts (the control, 3 seeds); 64 calibration windows of
256 tokens, perplexity on the whole test split (256-token windows).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import write_results  # noqa: E402

MODELS = {"moe": ROOT / "models" / "reference-moe", "moe-mixtral": ROOT / "models" / "reference-moe-mixtral"}
SHARES = (0.25, 0.5)  # of every layer's experts
RANDOM_SEEDS = (0, 1, 2)


def ratio_for(model, spec, removed: int, cost=None) -> float:
    """The prune.ratio whose uniform count is ``removed`` units per layer, a unit of block b costing
    ``cost(b, spec)`` parameters (default: one expert)."""
    from pruneflow.model import arch as A
    from pruneflow.units import experts as X

    per_step = sum((cost or X.expert_cost)(b, spec) for b in A.blocks(model, spec))
    return removed * per_step / A.count_parameters(model)["non_embedding"]


def load(path: Path, threads: int):
    """(dense model, tokenizer, spec, test token stream, 64 calibration windows of 256 tokens) of a benchmark
    model, torch on ``threads`` threads."""
    import torch

    from pruneflow.data import calibration as C
    from pruneflow.model import checkpoint
    from pruneflow.data import corpus

    torch.set_num_threads(threads)
    dense, tokenizer, spec = checkpoint.load(path)
    test = C.token_stream(tokenizer, corpus.load_split("test"))
    windows, _ = C.prepare(tokenizer, "corpus", 64, 256, 0, dense.config.max_position_embeddings)
    return dense, tokenizer, spec, test, windows


def run_model(name: str, path: Path, threads: int) -> list[dict]:
    import torch

    from pruneflow.model import arch as A
    from pruneflow.model import checkpoint
    from pruneflow.units import experts as X
    from pruneflow.evaluation.evaluate import measure
    from pruneflow.pipeline.params import PruneParams
    from pruneflow.selection.plan import SelectConfig
    from pruneflow.prune import prune
    from pruneflow.selection.scores import Scores

    dense, tokenizer, spec, test, windows = load(path, threads)
    experts = A.blocks(dense, spec)[0].get_submodule(spec.experts).num_experts
    base = {"model": name, "experts": experts, "top_k": dense.config.num_experts_per_tok,
            "layers": dense.config.num_hidden_layers}
    rows = [{**base, "method": "dense", "removed_per_layer": 0, **measure(dense, tokenizer, spec, None, test,
                                                                           speed=False)}]
    print(rows[-1], flush=True)
    for share in SHARES:
        removed = round(share * experts)
        ratio = ratio_for(dense, spec, removed)
        runs = [("router_weighted", "uniform", None), ("router_weighted", "global", None),
                ("expert_drop", "uniform", None)] + [("random", "uniform", s) for s in RANDOM_SEEDS]
        for method, allocation, seed in runs:
            model, _, _ = checkpoint.load(path, with_tokenizer=False)
            started = time.perf_counter()
            if method == "random":  # the control: seeded random expert scores, the same selection
                g = torch.Generator().manual_seed(seed)
                scores = Scores(heads=[], channels=[], experts=[torch.rand(experts, generator=g)
                                                                for _ in A.blocks(model, spec)])
                plan = X.select(model, spec, scores, SelectConfig(ratio=ratio, allocation="uniform"), "random", seed)
                X.apply(model, spec, plan.kept_experts)
            else:
                plan = prune(model, spec, method, PruneParams(ratio=ratio, allocation=allocation), windows).plan
            seconds = time.perf_counter() - started
            row = {**base, "method": method, "allocation": allocation, "seed": seed, "removed_per_layer": removed,
                   "ratio": ratio, "achieved_ratio": plan.params["achieved_ratio"], "prune_seconds": seconds,
                   "kept_per_layer": [len(k) for k in plan.kept_experts],
                   **measure(model, tokenizer, spec, None, test, speed=False)}
            rows.append(row)
            print({k: row[k] for k in ("model", "method", "allocation", "seed", "removed_per_layer", "test_ppl",
                                       "kept_per_layer")}, flush=True)
    return with_peak_memory(rows)


def with_peak_memory(rows: list[dict]) -> list[dict]:
    for row in rows:
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rows


def ensure_built(name: str, build: bool) -> None:
    """Train benchmark model ``name`` if it is missing and ``build`` says so; else exit naming the command."""
    if (MODELS[name] / "config.json").exists():
        return
    if not build:
        sys.exit(f"{MODELS[name]} is missing: run with --build (or `pruneflow reference build --config {name}`)")
    subprocess.run([sys.executable, "-m", "pruneflow.cli", "reference", "build", "--config", name], check=True)


def main(run=None, out: Path = ROOT / "benchmarks" / "experts.json", doc: str = __doc__) -> None:
    """The command line of this benchmark, or of another over the same models (``run(name, path, threads)``
    returns its rows)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--build", action="store_true", help="train the MoE models that are missing")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        ensure_built(name, args.build)
        rows += (run or run_model)(name, MODELS[name], args.threads)
    write_results(args.out, rows, args.threads, str(date.today()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
