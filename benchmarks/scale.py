"""Benchmark: the real code on random bf16 models with the exact geometry of Llama-3.1-8B and Llama-3.1-70B.

Each model is built at depth 1 and 2 (the full models' hidden size, heads, KV heads, MLP width and 128,256-token
vocabulary; seeded random weights, 1 GB shards; the reference tokenizer; cached under ``--cache``) and pruned
phase by phase with the library's own calls, once in memory and once streamed under ``--max-memory``, each in a
fresh process:

- ``load``: ``checkpoint.load`` (streamed: the skeleton, no weight read);
- ``statistics``: Bonsai's prior, wanda_sp's calibration pass (``--windows`` × ``--seqlen`` tokens);
- ``sub-models``: Bonsai's sub-model losses (``bonsai.sample_masks`` from random priors + ``submodel_losses``:
  ``--sub-models`` sub-models on ``--sub-windows`` windows, the paper's 32 rows per forward pass);
- ``apply``: the plan of −5% from the statistics (``prune.choose`` + ``apply_plan``);
- ``save``: ``checkpoint.save`` of the pruned model.

Per phase: seconds, bytes read from the checkpoint files (``streaming.READ``) and the process's peak resident
set in the phase (``Runtime.reset_peak``) above its resident set after imports. Extrapolated to the full depth L
(32 / 80) by the line through the two depths, ``value(L) = a + L × b`` with ``b`` the per-block cost, printed
beside each figure, next to the dry run's estimate for the full config (``pruneflow prune --dry-run``'s
accounting: bytes read and memory held, not seconds).

Bonsai's regression (``lasso.fit_cv``: 9 penalties × 5 folds + 1, batched, on the CPU in float64) is timed at
the full models' real candidate-column count (``bonsai.layout`` + ``candidate_count`` on the full config's
skeleton: 45,952 for 8B, 229,600 for 70B) on a design like Bonsai's: 200 sub-models in draw/complement pairs
keeping half of the candidates each, targets a sparse linear function of the kept columns plus noise.

    python benchmarks/scale.py [--shapes 8b 70b] [--modes memory streamed] [--no-regression] [--tiny]

``--tiny`` runs small stand-in shapes (a quick check of the script; nothing written). Writes
benchmarks/scale.json and prints markdown tables. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import ROOT, write_results  # noqa: E402

LLAMA3 = dict(vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
              rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16",
              rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"})
SHAPES = {
    "8b": dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
    "70b": dict(LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}
TINY = {
    "8b": dict(LLAMA3, vocab_size=8192, hidden_size=256, intermediate_size=896, num_hidden_layers=32,
               num_attention_heads=8, num_key_value_heads=2),
    "70b": dict(LLAMA3, vocab_size=32768, hidden_size=512, intermediate_size=1792, num_hidden_layers=80,
                num_attention_heads=8, num_key_value_heads=2),
}
# Streamed budgets: below the depth-1 models' weights (2.5 / 5.9 GB), above the least a streamed pass holds.
BUDGETS = {"8b": "2GiB", "70b": "5GiB"}
TINY_BUDGETS = {"8b": "8MiB", "70b": "60MiB"}  # with --windows 2 --seqlen 16 --sub-windows 2
DEPTHS = (1, 2)
PHASES = ("load", "statistics", "sub-models", "apply", "save")
ESTIMATED = {"load": "load", "statistics": "calibration statistics", "sub-models": "bonsai sub-models",
             "save": "save"}  # the dry run's phase for each measured one
GiB = 2 ** 30


def build(out: Path, shape: dict, depth: int) -> Path:
    """A seeded random bf16 Llama of ``shape`` cut to ``depth`` blocks, with the reference tokenizer (once)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**shape, "num_hidden_layers": depth})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(depth)
    state = {}
    for name, param in model.named_parameters():  # filled tensor by tensor: no float32 copy of the model
        if name.endswith("norm.weight"):
            state[name] = torch.ones(param.shape, dtype=torch.bfloat16)
        else:
            state[name] = (torch.randn(param.shape, generator=generator, dtype=torch.float32)
                           .mul_(0.02).to(torch.bfloat16))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    model.load_state_dict(state)
    del state
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "models" / "reference" / name, tmp / name)
    tmp.rename(out)
    return out


def config_only(out: Path, shape: dict) -> Path:
    """A directory holding only the full model's config.json and the tokenizer: what the dry run reads."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**shape, "model_type": "llama", "architectures":
                                                 ["LlamaForCausalLM"]}, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "models" / "reference" / name, out / name)
    return out


def run_job(job: dict) -> dict:
    """One (shape, depth, mode) in this process: each phase's seconds, bytes read and peak resident set."""
    import torch

    from pruneflow.model import checkpoint
    from pruneflow.execution import streaming
    from pruneflow.methods import bonsai
    from pruneflow.pipeline.params import PruneParams
    from pruneflow.prune import apply_plan, choose, score
    import psutil

    from pruneflow.execution.runtime import Runtime

    torch.set_num_threads(job["threads"])
    runtime = Runtime.create(device="cpu", dtype="auto", max_memory=job["max_memory"])
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 4096, (job["windows"], job["seqlen"]), generator=generator)
    cfg = PruneParams(ratio=0.05, units=["channels", "heads"]).for_method("wanda_sp")
    baseline = psutil.Process().memory_info().rss
    phases, state = {}, {}

    def phase(name, work):
        runtime.reset_peak()
        read, started = streaming.READ["bytes"], time.perf_counter()
        out = work()
        phases[name] = {"seconds": time.perf_counter() - started, "bytes_read": streaming.READ["bytes"] - read,
                        "peak_above_baseline": runtime.peak_bytes()["peak_bytes"] - baseline}
        print(f"  {job['shape']} depth {job['depth']} {job['mode']}: {name} {phases[name]['seconds']:.1f} s",
              file=sys.stderr, flush=True)
        return out

    def load():
        model, tokenizer, spec = checkpoint.load(job["model"], runtime, stream=True,
                                                 calibration=(job["windows"], job["seqlen"]))
        state.update(model=model, tokenizer=tokenizer, spec=spec)

    phase("load", load)
    model, spec = state["model"], state["spec"]
    scores = phase("statistics", lambda: score(model, spec, "wanda_sp", windows, 0, 0.05, runtime))

    def sub_models():
        modules = bonsai.layout(model, spec, ("channels", "heads"), "auto")
        priors = bonsai.unit_priors(model, spec, windows, runtime, modules, "random", 0)  # no pass of its own
        keep, _ = bonsai.sample_masks(modules, priors, 0.05, job["sub_models"], "fixed", generator)
        return bonsai.submodel_losses(model, spec, modules, keep, windows[: job["sub_windows"]], 32, runtime)

    losses = phase("sub-models", sub_models)
    phase("apply", lambda: apply_plan(model, spec, choose(model, spec, "wanda_sp", cfg, scores, windows, runtime)[0],
                                      scores, windows, runtime))
    out = Path(job["out"])
    shutil.rmtree(out, ignore_errors=True)
    phase("save", lambda: checkpoint.save(model, state["tokenizer"], out, spec, dtype=torch.bfloat16,
                                          runtime=runtime))
    shutil.rmtree(out, ignore_errors=True)
    return {**{k: job[k] for k in ("shape", "depth", "mode", "max_memory", "windows", "seqlen", "sub_models",
                                   "sub_windows")},
            "baseline_rss": baseline, "losses_finite": bool(torch.isfinite(losses).all()), "phases": phases}


def columns(shape: dict) -> int:
    """Bonsai's candidate columns in one iteration of the full model (its layout on the config's skeleton)."""
    import tempfile

    from pruneflow.execution.estimate import skeleton
    from pruneflow.methods import bonsai

    with tempfile.TemporaryDirectory() as tmp:
        model, spec, _ = skeleton(config_only(Path(tmp), shape))
    modules = bonsai.layout(model, spec, ("channels", "heads"), "auto")
    return sum(bonsai.candidate_count(m.count, 0.05)[0] for m in modules)


def bonsai_design(columns: int, rows: int, seed: int = 0):
    """(x (rows, columns) float64, y (rows,)): sub-models in draw/complement pairs each keeping half of the
    candidate columns, targets a sparse linear function of the kept columns (5% of them matter) plus noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    draws = torch.rand(rows // 2, columns, generator=g) < 0.5
    x = torch.stack([draws, ~draws], 1).reshape(rows, columns).double()
    w = torch.zeros(columns, dtype=torch.float64)
    important = torch.randperm(columns, generator=g)[: max(1, columns // 20)]
    w[important] = -torch.rand(len(important), generator=g, dtype=torch.float64) / len(important)
    y = x @ w + 0.01 * w.abs().sum() / 20 * torch.randn(rows, generator=g, dtype=torch.float64)
    return x, y


def run_regression(job: dict) -> dict:
    """``lasso.fit_cv`` on a Bonsai-like design of ``job['columns']`` columns (see the module docstring)."""
    import torch

    from pruneflow.methods.lasso import fit_cv

    torch.set_num_threads(job["threads"])
    x, y = bonsai_design(job["columns"], job["rows"])
    started = time.perf_counter()
    fit = fit_cv(x, y)
    return {**{k: job[k] for k in ("shape", "columns", "rows")}, "seconds": time.perf_counter() - started,
            "penalty": fit.penalty, "cv_tau": fit.cv_tau, "device": "cpu", "dtype": "float64"}


def estimates(shape_name: str, shape: dict, job: dict, where: Path) -> dict:
    """The dry run's phases for the full-depth config with this benchmark's sizes, in memory and streamed."""
    from pruneflow.execution.estimate import estimate
    from pruneflow.pipeline.params import Params
    from pruneflow.execution.runtime import Runtime

    path = config_only(where / f"{shape_name}-config", shape)
    params = Params.model_validate({
        "model": str(path), "calibrate": {"n_windows": job["windows"], "seqlen": job["seqlen"]},
        "score": {"method": "bonsai", "bonsai": {"sub_models": job["sub_models"], "n_windows": job["sub_windows"],
                                                 "prune_frac": 0.05}},
        "prune": {"ratio": 0.05}})
    out = {}
    for mode, budget in (("memory", None), ("streamed", job["budget"])):
        e = estimate(path, params, Runtime.create(device="cpu", dtype="auto", max_memory=budget))
        out[mode] = {p.name: {"read_bytes": p.read_bytes, "peak_bytes": p.peak_bytes, "passes": p.passes}
                     for p in e.phases}
    return out


def _subprocess(kind: str, job: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, f"--{kind}", json.dumps(job)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    sys.stderr.write(proc.stderr[-3000:] if proc.returncode else "".join(
        line + "\n" for line in proc.stderr.splitlines() if line.startswith("  ")))
    if proc.returncode != 0:
        raise SystemExit(f"{kind} {job} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def line(values: dict[int, float], depth: int) -> tuple[float, float, float]:
    """(a, b, value at ``depth``) of the line through the shallowest and deepest measured depths,
    value(L) = a + L × b; never below the largest measured value (a negative slope is noise: file cache)."""
    (d1, v1), (d2, v2) = min(values.items()), max(values.items())
    b = (v2 - v1) / (d2 - d1)
    a = v1 - d1 * b
    return a, b, max(a + depth * b, max(values.values()))


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def tables(rows: list[dict], regressions: list[dict], dry: dict, shapes: dict) -> str:
    out = []
    for shape_name, shape in shapes.items():
        depth = shape["num_hidden_layers"]
        for mode in ("memory", "streamed"):
            runs = {r["depth"]: r for r in rows if r["shape"] == shape_name and r["mode"] == mode}
            if len(runs) < 2:
                continue
            budget = next(iter(runs.values()))["max_memory"]
            measured = sorted(runs)
            out.append(f"\n**{shape_name}, {mode}{f' under --max-memory {budget}' if budget else ''}** — measured "
                       f"at depth {', '.join(map(str, measured))}, extrapolated to L = {depth}: value(L) = a + L × b "
                       f"through depths {measured[0]} and {measured[-1]}"
                       + ("; streamed, the peak is the most any depth held (a block at a time: it does not grow "
                          "with depth)" if mode == "streamed" else "") + "\n")
            out.append(f"| phase | seconds (depth {' / '.join(map(str, measured))}) | per block b | a | seconds at L | "
                       "GB read at L (a + L × b) | dry run: GB read | peak above imports at L | dry run: held |")
            out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for name in PHASES:
                seconds = {d: r["phases"][name]["seconds"] for d, r in runs.items()}
                read = {d: r["phases"][name]["bytes_read"] for d, r in runs.items()}
                peak = {d: r["phases"][name]["peak_above_baseline"] for d, r in runs.items()}
                a, b, full = line(seconds, depth)
                ra, rb, rfull = line(read, depth)
                if mode == "streamed":
                    held = f"{max(peak.values()) / 1e9:.2f} GB (depths: " + \
                        " / ".join(f"{peak[d] / 1e9:.2f}" for d in measured) + ")"
                else:
                    pa, pb, pfull = line(peak, depth)
                    held = f"{pfull / 1e9:.1f} GB ({pa / 1e9:.2f} + L × {pb / 1e9:.3f})"
                estimated = dry.get(shape_name, {}).get(mode, {}).get(ESTIMATED.get(name, ""), None)
                out.append(f"| {name} | {' / '.join(f'{seconds[d]:.1f}' for d in measured)} | {b:.2f} s | {a:.1f} s | "
                           f"{full:.0f} s | {rfull / 1e9:.1f} ({ra / 1e9:.2f} + L × {rb / 1e9:.2f}) | "
                           f"{_gb(estimated['read_bytes']) if estimated else '—'} | {held} | "
                           f"{_gb(estimated['peak_bytes']) if estimated else '—'} |")
    if regressions:
        out.append("\n**Bonsai's regression** (`lasso.fit_cv`: 9 penalties × 5 folds batched + 1 fit, float64 on the CPU)\n")
        out.append("| shape | candidate columns | sub-models | seconds |")
        out.append("|---|---:|---:|---:|")
        for r in regressions:
            out.append(f"| {r['shape']} | {r['columns']:,} | {r['rows']} | {r['seconds']:.0f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--modes", nargs="+", default=["memory", "streamed"], choices=["memory", "streamed"])
    parser.add_argument("--windows", type=int, default=8, help="calibration windows of the statistics pass")
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--sub-models", type=int, default=8)
    parser.add_argument("--sub-windows", type=int, default=4, help="windows each sub-model is scored on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-regression", action="store_true")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/pruneflow-scale"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "scale.json")
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS), help="depths each shape is built at")
    parser.add_argument("--merge", action="store_true",
                        help="replace only the rows measured now in --out (same shape, depth and mode)")
    parser.add_argument("--report", action="store_true", help="print the tables of --out; run nothing")
    parser.add_argument("--tiny", action="store_true", help="small stand-in shapes; writes nothing")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--regression", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job or args.regression:
        result = run_job(json.loads(args.job)) if args.job else run_regression(json.loads(args.regression))
        print(json.dumps(result))
        return
    if args.report:
        data = json.loads(args.out.read_text())["rows"]
        print(tables(*_split(data), SHAPES))
        return
    shapes = {k: (TINY if args.tiny else SHAPES)[k] for k in args.shapes}
    budgets = TINY_BUDGETS if args.tiny else BUDGETS
    sizes = dict(windows=args.windows, seqlen=args.seqlen, sub_models=args.sub_models, sub_windows=args.sub_windows,
                 threads=args.threads)
    rows, regressions, dry = [], [], {}
    for name, shape in shapes.items():
        tag = f"{name}{'-tiny' if args.tiny else ''}"
        for depth in args.depths:
            path = build(args.cache / f"llama-{tag}-{depth}", shape, depth)
            for mode in args.modes:
                job = dict(sizes, shape=name, depth=depth, mode=mode, model=str(path),
                           max_memory=budgets[name] if mode == "streamed" else None,
                           out=str(args.cache / "out"))
                rows.append(_subprocess("job", job))
        dry[name] = estimates(name, shape, dict(sizes, budget=budgets[name]), args.cache)
        if not args.no_regression:
            regressions.append(_subprocess("regression", dict(shape=name, columns=columns(shape), rows=200,
                                                              threads=args.threads)))
    if args.merge and args.out.exists():
        old_rows, old_regressions, old_dry = _split(json.loads(args.out.read_text())["rows"])
        fresh = {(r["shape"], r["depth"], r["mode"]) for r in rows}
        rows = [r for r in old_rows if (r["shape"], r["depth"], r["mode"]) not in fresh] + rows
        regressions = regressions or old_regressions
        dry = {**old_dry, **dry}
    print(tables(rows, regressions, dry, SHAPES if not args.tiny else shapes))
    if not args.tiny:
        write_results(args.out, rows + regressions + [{"dry_run": dry}], args.threads,
                      time.strftime("%Y-%m-%d"), budgets=budgets, sizes=sizes)


def _split(data: list[dict]) -> tuple[list[dict], list[dict], dict]:
    """scale.json's rows → (phase rows, regression rows, dry-run estimates)."""
    rows = [r for r in data if "phases" in r]
    regressions = [r for r in data if "columns" in r]
    dry = next((r["dry_run"] for r in data if "dry_run" in r), {})
    return rows, regressions, dry


if __name__ == "__main__":
    main()
