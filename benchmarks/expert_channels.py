"""Channels inside the experts on the two MoE benchmark models: test perplexity after narrowing every expert.

    python benchmarks/expert_channels.py [--threads 2] [--out benchmarks/expert_channels.json] [--build]

The models of ``benchmarks/experts.py`` (Qwen3-MoE: 4 layers, 8 experts of 256 channels, top-2; Mixtral: 6
layers, 16 experts of 96 channels, top-4, tied embeddings; ``--build`` trains any that is missing). For each,
1/4 and 1/2 of every expert's channels are removed (the prune.ratio whose uniform width is that) by
``magnitude``, ``wanda_sp`` and ``flap`` (uniform; flap without its bias, which experts cannot take),
``wanda_sp`` and ``flap`` ranked globally (widths per layer), and seeded random scores (the control, 3 seeds);
for comparison at the same parameter ratio, ``minitron``'s hidden channels (the residual stream, router and
experts' hidden axis; width a multiple of 8). 64 calibration windows of 256 tokens, perplexity on the whole test split (256-token windows).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.experts import load, main, ratio_for, with_peak_memory  # noqa: E402

SHARES = (0.25, 0.5)  # of every expert's channels
RANDOM_SEEDS = (0, 1, 2)
RUNS = [("magnitude", "uniform", None), ("wanda_sp", "uniform", None), ("flap", "uniform", None),
        ("wanda_sp", "global", None), ("flap", "global", None)] + [("random", "uniform", s) for s in RANDOM_SEEDS] + \
       [("minitron", "uniform", None)]


def run_model(name: str, path: Path, threads: int) -> list[dict]:
    from pruneflow.model import arch as A
    from pruneflow.model import checkpoint
    from pruneflow.units import expert_channels as XC
    from pruneflow.evaluation.evaluate import measure
    from pruneflow.pipeline.params import PruneParams
    from pruneflow.prune import prune

    dense, tokenizer, spec, test, windows = load(path, threads)
    width = A.layer_widths(dense, spec)[0]["channels"]
    base = {"model": name, "experts": A.layer_widths(dense, spec)[0]["experts"], "expert_width": width,
            "layers": dense.config.num_hidden_layers}
    rows = [{**base, "method": "dense", "removed_per_expert": 0, **measure(dense, tokenizer, spec, None, test,
                                                                            speed=False)}]
    print(rows[-1], flush=True)
    for share in SHARES:
        removed = round(share * width)
        ratio = ratio_for(dense, spec, removed, XC.slot_cost)  # removed channels from every expert
        for method, allocation, seed in RUNS:
            model, _, _ = checkpoint.load(path, with_tokenizer=False)
            started = time.perf_counter()
            units = ["hidden"] if method == "minitron" else ["channels"]
            cfg = PruneParams(ratio=ratio, units=units, allocation=allocation, reconstruct="none")
            plan = prune(model, spec, method, cfg, windows, seed=seed or 0).plan
            seconds = time.perf_counter() - started
            row = {**base, "method": method, "units": units[0], "allocation": allocation, "seed": seed,
                   "removed_per_expert": removed, "ratio": ratio, "achieved_ratio": plan.params["achieved_ratio"],
                   "prune_seconds": seconds, "width_per_layer": plan.params.get("expert_width_after"),
                   "hidden_after": plan.params.get("hidden_after"),
                   **measure(model, tokenizer, spec, None, test, speed=False)}
            rows.append(row)
            print({k: row[k] for k in ("model", "method", "allocation", "seed", "removed_per_expert", "test_ppl",
                                       "width_per_layer")}, flush=True)
    return with_peak_memory(rows)


if __name__ == "__main__":
    main(run_model, ROOT / "benchmarks" / "expert_channels.json", __doc__)
