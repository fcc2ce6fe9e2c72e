"""Channels inside the experts on the two MoE benchmark models: test perplexity after narrowing every expert.

    python benchmarks/expert_channels.py [--threads 2] [--out benchmarks/expert_channels.json] [--build]

The models of ``benchmarks/experts.py`` (Qwen3-MoE: 4 layers, 8 experts of 256 channels, top-2; Mixtral: 6
layers, 16 experts of 96 channels, top-4, tied embeddings; ``--build`` trains any that is missing). For each,
1/4 and 1/2 of every expert's channels are removed (the prune.ratio whose uniform width is that) by
``magnitude``, ``wanda_sp`` and ``flap`` (uniform; flap without its bias, which experts cannot take),
``wanda_sp`` and ``flap`` ranked globally (widths per layer), and seeded random scores (the control, 3 seeds);
64 calibration windows of 256 tokens, perplexity on the whole test split (256-token windows).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import write_results  # noqa: E402
from benchmarks.experts import MODELS, ensure_built  # noqa: E402

SHARES = (0.25, 0.5)  # of every expert's channels
RANDOM_SEEDS = (0, 1, 2)
RUNS = [("magnitude", "uniform", None), ("wanda_sp", "uniform", None), ("flap", "uniform", None),
        ("wanda_sp", "global", None), ("flap", "global", None)] + [("random", "uniform", s) for s in RANDOM_SEEDS]


def ratio_for(model, spec, removed: int) -> float:
    """The prune.ratio whose uniform width removes ``removed`` channels from every expert."""
    from pruneflow import arch as A
    from pruneflow import expert_channels as XC

    per_step = sum(XC.slot_cost(b, spec) for b in A.blocks(model, spec))
    return removed * per_step / A.count_parameters(model)["non_embedding"]


def run_model(name: str, path: Path, threads: int) -> list[dict]:
    import torch

    from pruneflow import arch as A
    from pruneflow import calibration as C
    from pruneflow import checkpoint, corpus
    from pruneflow.evaluate import measure
    from pruneflow.params import PruneParams
    from pruneflow.prune import prune

    torch.set_num_threads(threads)
    dense, tokenizer, spec = checkpoint.load(path)
    test = C.token_stream(tokenizer, corpus.load_split("test"))
    windows, _ = C.prepare(tokenizer, "corpus", 64, 256, 0, dense.config.max_position_embeddings)
    width = A.layer_widths(dense, spec)[0]["channels"]
    base = {"model": name, "experts": A.layer_widths(dense, spec)[0]["experts"], "expert_width": width,
            "layers": dense.config.num_hidden_layers}
    rows = [{**base, "method": "dense", "removed_per_expert": 0, **measure(dense, tokenizer, spec, None, test,
                                                                            speed=False)}]
    print(rows[-1], flush=True)
    for share in SHARES:
        removed = round(share * width)
        ratio = ratio_for(dense, spec, removed)
        for method, allocation, seed in RUNS:
            model, _, _ = checkpoint.load(path, with_tokenizer=False)
            started = time.perf_counter()
            cfg = PruneParams(ratio=ratio, units=["channels"], allocation=allocation, reconstruct="none")
            plan = prune(model, spec, method, cfg, windows, seed=seed or 0).plan
            seconds = time.perf_counter() - started
            row = {**base, "method": method, "allocation": allocation, "seed": seed, "removed_per_expert": removed,
                   "ratio": ratio, "achieved_ratio": plan.params["achieved_ratio"], "prune_seconds": seconds,
                   "width_per_layer": plan.params["expert_width_after"],
                   **measure(model, tokenizer, spec, None, test, speed=False)}
            rows.append(row)
            print({k: row[k] for k in ("model", "method", "allocation", "seed", "removed_per_expert", "test_ppl",
                                       "width_per_layer")}, flush=True)
    for row in rows:
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "expert_channels.json")
    parser.add_argument("--build", action="store_true", help="train the MoE models that are missing")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        ensure_built(name, args.build)
        rows += run_model(name, MODELS[name], args.threads)
    write_results(args.out, rows, args.threads, str(date.today()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
