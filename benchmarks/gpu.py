"""Benchmark on one GPU: a Llama-3-8B-shaped model (random init, bf16) — scoring time, Bonsai throughput, peak
memory against inference, and prefill/decode speed of pruned models against their ideal.

    python benchmarks/gpu.py                    # the 8B shape on cuda (about 4 minutes on an H200)
    python benchmarks/gpu.py --tiny --device cpu   # the same steps on a tiny shape (seconds; what the tests run)

Measures, on random tokens (a random-init model: speed and memory are what matter, not quality):
- FLAP and Wanda-sp scoring seconds over ``--windows`` × ``--seqlen`` calibration tokens;
- Bonsai: seconds per sub-model with 1, 2, 4, 8 sub-models per forward pass (``--bonsai-windows`` windows each);
- peak memory of each scorer (``torch.cuda.max_memory_allocated``; peak RSS on CPU) and of an inference-only
  forward of the same batch (``model(input_ids)``, full logits), and their ratio;
- Bonsai's regression (``lasso.fit_cv``: 9 penalties × 5 folds + 1 fits batched) at ``--columns`` candidate
  columns (an 8B iteration's 45,952) × 200 sub-models on the device, and on this machine's CPU for comparison,
  with the largest difference between the two fits' weights (``benchmarks/scale.py``'s design);
- prefill tokens/s (one ``--prefill`` -token sequence) and greedy decode tokens/s (batch 1, KV cache, ``--decode``
  new tokens) of the dense model and of FLAP-pruned copies at 20% and 50% (uniform), against the ideal: the
  ratio of forward FLOPs per token (2 · matmul parameters + attention over the context).

Imports only torch, transformers and pruneflow's library (no prefect, mlflow, dvc, lm-eval). The lent GPU
machine has no pydantic, which pruneflow's parameter models need: carry its wheels (pydantic, pydantic-core,
annotated-types, typing-inspection) as the device tool's README describes. Writes ``--out`` (JSON) and prints
markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # Llama-3-8B's geometry, and a tiny one with the same structure for CPU checks
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
    "tiny": dict(hidden_size=128, intermediate_size=448, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024),
}


def build(shape: str, runtime, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], rope_theta=500000.0, tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialised in bf16 on the device: no fp32 copy of 8B parameters
    try:
        with runtime.device:
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model


def _timed(runtime, fn):
    runtime.synchronize()
    started = time.perf_counter()
    value = fn()
    runtime.synchronize()
    return value, time.perf_counter() - started


def _peak(runtime, fn) -> tuple[object, float, int]:
    """(result, seconds, peak bytes) of ``fn``, the peak window starting at the call."""
    runtime.free()
    runtime.reset_peak()
    value, seconds = _timed(runtime, fn)
    return value, seconds, runtime.peak_bytes()["peak_bytes"]


def inference_peak(model, runtime, batch: torch.Tensor) -> int:
    with torch.no_grad():
        return _peak(runtime, lambda: model(input_ids=batch.to(runtime.input_device(model)), use_cache=False))[2]


def scoring(model, spec, runtime, windows: torch.Tensor) -> list[dict]:
    from pruneflow.prune import score

    rows = []
    reference = inference_peak(model, runtime, windows[:8])  # the scorers' batch: 8 windows
    for method in ("flap", "wanda_sp"):
        _, seconds, peak = _peak(runtime, lambda: score(model, spec, method, windows, runtime=runtime))
        rows.append({"method": method, "seconds": seconds, "peak_bytes": peak, "inference_peak_bytes": reference,
                     "ratio_to_inference": peak / reference})
    return rows


def bonsai_throughput(model, spec, runtime, windows: torch.Tensor, sub_models: int, multiples: list[int]) -> list[dict]:
    from pruneflow.methods import bonsai

    modules = bonsai.layout(model, spec, ("channels", "heads"), "auto")
    priors = bonsai.unit_priors(model, spec, windows, runtime, modules, "wanda_sp", 0)
    keep, _ = bonsai.sample_masks(modules, priors, 0.05, sub_models, "varied", torch.Generator().manual_seed(0))
    n = len(windows)
    bonsai.submodel_losses(model, spec, modules, keep[:2], windows, n, runtime)  # warm-up
    rows, reference = [], None
    for multiple in multiples:
        batch = windows.repeat(multiple, 1)[: multiple * n]
        reference_peak = inference_peak(model, runtime, batch)
        losses, seconds, peak = _peak(runtime, lambda: bonsai.submodel_losses(
            model, spec, modules, keep, windows, multiple * n, runtime))
        reference = losses if reference is None else reference
        rows.append({"sub_models_per_forward": multiple, "rows_per_forward": multiple * n,
                     "seconds_per_sub_model": seconds / sub_models, "peak_bytes": peak,
                     "inference_peak_bytes": reference_peak, "ratio_to_inference": peak / reference_peak,
                     "max_loss_diff": float((losses - reference).abs().max())})
    return rows


def regression(runtime, columns: int, rows: int = 200) -> dict:
    """Seconds of ``lasso.fit_cv`` on the runtime's device and on the CPU, and how far apart their fits are."""
    from benchmarks.scale import bonsai_design
    from pruneflow.methods.lasso import fit_cv

    x, y = bonsai_design(columns, rows)
    out = {"columns": columns, "rows": rows}
    fits = {}
    for where in dict.fromkeys([str(runtime.device), "cpu"]):
        runtime.synchronize()
        started = time.perf_counter()
        fits[where] = fit_cv(x, y, device=where)
        runtime.synchronize()
        out[f"seconds_{'device' if where != 'cpu' else 'cpu'}"] = time.perf_counter() - started
    out["same_penalty"] = len({f.penalty for f in fits.values()}) == 1
    out["max_weight_difference"] = max(float((f.weights.cpu() - fits["cpu"].weights).abs().max()) for f in fits.values())
    return out


def forward_flops(model, spec, tokens: int) -> float:
    """Forward FLOPs per token at a context of ``tokens``: 2 · (matmul parameters) + 4 · attention width · context."""
    from pruneflow.model import arch as A

    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = A.geometry(model.config).head_dim
    attention = sum(4 * A.get(block, spec.q).out_features // head_dim * head_dim * tokens / 2
                    for block in A.blocks(model, spec))  # QKᵀ and AV over half the context on average
    return 2.0 * matmul + attention


def speed(models: dict, spec, runtime, prefill: int, decode: int, rounds: int) -> list[dict]:
    from pruneflow.evaluation.evaluate import decode_rate, prefill_seconds

    times = {name: {"prefill": [], "decode": []} for name in models}
    for round_ in range(rounds + 1):  # round 0 warms up; round-robin so drift falls on every model alike
        for name, model in models.items():
            seconds = prefill_seconds(model, runtime, prefill)
            rate = decode_rate(model, runtime, new_tokens=decode)
            if round_:
                times[name]["prefill"].append(prefill / seconds)
                times[name]["decode"].append(rate)
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    dense_flops = forward_flops(models["dense"], spec, prefill)
    dense = {k: median(v) for k, v in times["dense"].items()}
    rows = []
    for name, model in models.items():
        row = {"model": name, "prefill_tok_s": median(times[name]["prefill"]),
               "decode_tok_s": median(times[name]["decode"])}
        row |= {"prefill_speedup": row["prefill_tok_s"] / dense["prefill"],
                "decode_speedup": row["decode_tok_s"] / dense["decode"],
                "ideal_speedup": dense_flops / forward_flops(model, spec, prefill)}
        rows.append(row)
    return rows


def pruned_copy(model, spec, runtime, windows, ratio: float):
    from pruneflow.pipeline.params import PruneParams
    from pruneflow.prune import prune

    copy_ = copy.deepcopy(model)
    result = prune(copy_, spec, "flap", PruneParams(ratio=ratio, allocation="uniform"), windows, runtime=runtime)
    return copy_, result.plan.params["achieved_ratio"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape (CPU checks)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bonsai-windows", type=int, default=8)
    parser.add_argument("--bonsai-sub-models", type=int, default=16)
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--columns", type=int, default=45952, help="Bonsai's candidate columns in the regression")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu.json")
    args = parser.parse_args(argv)
    if args.tiny:
        args.windows, args.seqlen, args.prefill, args.decode, args.rounds = 8, 64, 128, 8, 1
        args.bonsai_windows, args.bonsai_sub_models, args.columns = 2, 4, 400

    sys.path.insert(0, str(ROOT))
    from pruneflow.model import arch as A
    from pruneflow.execution.runtime import Runtime

    runtime = Runtime.create(args.device, "bfloat16")
    started = time.perf_counter()
    model = build("tiny" if args.tiny else "8b", runtime, torch.bfloat16)
    spec = A.arch_for("llama")
    vocab = model.config.vocab_size
    windows = torch.randint(0, vocab, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0))
    print(f"model: {A.count_parameters(model)['total'] / 1e9:.2f} B parameters, bf16, on {runtime.device}",
          file=sys.stderr)
    report = {"machine": machine(runtime), "shape": "tiny" if args.tiny else "llama-3-8b", "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    report["scoring"] = scoring(model, spec, runtime, windows)
    report["bonsai"] = bonsai_throughput(model, spec, runtime, windows[: args.bonsai_windows],
                                         args.bonsai_sub_models, args.multiples)
    report["regression"] = regression(runtime, args.columns)
    models, achieved = {"dense": model}, {}
    for ratio in (0.2, 0.5):
        models[f"flap −{ratio:.0%}"], achieved[f"flap −{ratio:.0%}"] = pruned_copy(model, spec, runtime, windows, ratio)
    report["speed"] = speed(models, spec, runtime, args.prefill, args.decode, args.rounds)
    for row in report["speed"]:
        row["achieved_ratio"] = achieved.get(row["model"], 0.0)
    report["seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(tables(report))
    return report


def machine(runtime) -> dict:
    info = {"platform": platform.platform(), "torch": torch.__version__, "device": str(runtime.device),
            "date": time.strftime("%Y-%m-%d")}
    if runtime.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(runtime.device)
    import transformers

    info["transformers"] = transformers.__version__
    return info


def tables(report: dict) -> str:
    gib = 2**30
    lines = [f"{report['shape']} on {report['machine'].get('gpu', report['machine']['device'])}, "
             f"{report['seconds']:.0f} s in all\n",
             "| scorer | seconds | peak GiB | inference forward GiB | ratio |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['seconds']:.2f} | {r['peak_bytes'] / gib:.2f} | "
              f"{r['inference_peak_bytes'] / gib:.2f} | {r['ratio_to_inference']:.2f} |" for r in report["scoring"]]
    lines += ["", "| Bonsai sub-models per forward | rows | s / sub-model | peak GiB | inference GiB | ratio |",
              "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['sub_models_per_forward']} | {r['rows_per_forward']} | {r['seconds_per_sub_model']:.3f} | "
              f"{r['peak_bytes'] / gib:.2f} | {r['inference_peak_bytes'] / gib:.2f} | {r['ratio_to_inference']:.2f} |"
              for r in report["bonsai"]]
    r = report["regression"]
    lines += ["", "| regression columns × sub-models | device s | CPU s | same penalty | max weight difference |",
              "|---|---:|---:|---|---:|",
              f"| {r['columns']:,} × {r['rows']} | {r.get('seconds_device', float('nan')):.1f} | {r['seconds_cpu']:.1f} | "
              f"{r['same_penalty']} | {r['max_weight_difference']:.2e} |"]
    lines += ["", "| model | removed | prefill tok/s | decode tok/s | prefill × | decode × | ideal × |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['achieved_ratio']:.1%} | {r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:.1f} | "
              f"{r['prefill_speedup']:.2f} | {r['decode_speedup']:.2f} | {r['ideal_speedup']:.2f} |"
              for r in report["speed"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
