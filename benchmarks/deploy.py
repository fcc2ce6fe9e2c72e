"""Benchmark: the deployable table — prune × quantize × engine on both committed reference models.

Rows: the dense model and two recipes at 20% and 50% of the non-embedding parameters — the best forward-only
recipe of BENCHMARKS.md (FLAP, allocation search, lstsq re-fit: per-layer heads and channels, served by llama.cpp
as ``deci``) and a vLLM-servable one (FLAP on MLP channels only, allocation search, lstsq: per-layer MLP widths,
served by vLLM through ``pruneflow export vllm``) — each as f16, q8_0 and q4_k_m GGUF (llama.cpp's own quantizer):
size on disk, perplexity measured in llama.cpp (the engine's logits over the first test windows of the packaged
corpus, the pinned protocol), prefill latency and greedy decode speed in llama.cpp; each speed beside its ideal
(prefill: the dense f16 file's matmul + attention FLOPs over this file's; decode: the weight bytes a token reads,
dense f16 over this file). For the dense and vLLM-servable checkpoints also vLLM's offline throughput (its CPU
build, ``.venv-vllm``: a batch of requests generated at once, output tokens/s), beside the FLOP ideal.

Writes benchmarks/deploy.json and prints the Markdown table of BENCHMARKS.md's "Deploy" section. Not a test: run
it by hand, alone on the machine, `python benchmarks/deploy.py` (about 15 minutes on 2 cores; --no-vllm without
the vLLM venv).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "deploy.json"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
# (label, units, allocation, reconstruct, served by vLLM)
RECIPES = [
    ("flap heads+channels search lstsq", ["heads", "channels"], "search", "lstsq", False),
    ("flap channels search lstsq (vLLM)", ["channels"], "search", "lstsq", True),
]
QUANTS = ["f16", "q8_0", "q4_k_m"]
PPL_WINDOWS, SEQLEN, DECODE_TOKENS = 64, 256, 64
VLLM_LOAD = {"requests": 32, "prompt_tokens": 64, "max_tokens": 64, "rounds": 3}


def gguf_costs(path: Path) -> dict:
    """What one token costs in a GGUF file: the weight bytes it reads (every matrix; of the token embedding only
    when it is also the output) and the FLOPs of a SEQLEN-token prefill per token (2 per matmul weight, plus the
    attention scores and sums at the mean context SEQLEN/2 over the query rows of every block)."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    tied = "output.weight" not in tensors
    read = flops = 0
    for name, t in tensors.items():
        if len(t.shape) < 2:
            continue  # norms
        if name == "token_embd.weight" and not tied:
            continue  # a lookup reads one row
        read += int(t.n_bytes)
        flops += 2 * int(t.n_elements)
        if name.endswith("attn_q.weight"):
            flops += 2 * 2 * (SEQLEN // 2) * int(t.shape[1])  # QK^T and AV over the query rows
    return {"bytes_read": read, "flops": flops}


def prune_all(model_name: str, work: Path, threads: int) -> dict[str, tuple[Path, dict]]:
    """The dense checkpoint and each recipe × ratio, pruned with pruneflow (calibration: 64 windows of 256)."""
    import torch

    from pruneflow.data import calibration as C
    from pruneflow.execution.runtime import Runtime
    from pruneflow.model import checkpoint
    from pruneflow.pipeline.params import PruneParams
    from pruneflow.prune import prune

    torch.set_num_threads(threads)
    runtime = Runtime.create("cpu", "auto")
    source = ROOT / "models" / model_name
    models = {"dense": (source, {"recipe": "dense", "ratio": 0.0, "achieved_ratio": 0.0, "vllm": True})}
    for ratio in (0.2, 0.5):
        for label, units, allocation, reconstruct, vllm in RECIPES:
            model, tokenizer, spec = checkpoint.load(source, runtime)
            windows, _ = C.prepare(tokenizer, "corpus", 64, 256, 0, model.config.max_position_embeddings)
            started = time.perf_counter()
            result = prune(model, spec, "flap", PruneParams(ratio=ratio, units=units, allocation=allocation,
                                                            reconstruct=reconstruct), windows, runtime=runtime)
            out = work / f"{model_name}-{label.split()[1]}-{int(ratio * 100)}"
            checkpoint.save(model, tokenizer, out, spec)
            models[out.name] = (out, {"recipe": label, "ratio": ratio, "vllm": vllm,
                                      "achieved_ratio": result.plan.params["achieved_ratio"],
                                      "prune_seconds": time.perf_counter() - started})
            print(f"pruned {out.name}", flush=True)
    return models


def llama_cpp_rows(model_name: str, models: dict, work: Path, threads: int) -> list[dict]:
    from pruneflow.data import calibration as C
    from pruneflow.evaluation.evaluate import llama_cpp_perplexity, llama_cpp_speed
    from pruneflow.model import checkpoint
    from pruneflow.model.export import export_gguf

    stream = C.held_out(checkpoint.load_tokenizer(ROOT / "models" / model_name), "corpus")
    files, rows = [], []
    for name, (path, info) in models.items():
        for quant in QUANTS:
            gguf_path = work / f"{name}-{quant}.gguf"
            summary = export_gguf(path, gguf_path, "f16", quantize=None if quant == "f16" else quant)
            fallbacks = summary.get("quantize", {}).get("fallback_count", 0)
            rows.append({"model": model_name, **info, "name": name, "quant": quant, "architecture":
                         summary["architecture"], "bytes": gguf_path.stat().st_size, "fallbacks": fallbacks,
                         **gguf_costs(gguf_path),
                         "llama_cpp_ppl": llama_cpp_perplexity(gguf_path, stream, SEQLEN, PPL_WINDOWS, threads)})
            files.append(gguf_path)
            print(json.dumps(rows[-1]), flush=True)
    vocab = checkpoint.read_config(ROOT / "models" / model_name)["vocab_size"]
    speeds = llama_cpp_speed(files, vocab, threads, SEQLEN, DECODE_TOKENS)  # round-robin over all files
    for row, speed in zip(rows, speeds):
        row.update(speed)
    return rows


def vllm_rows(model_name: str, models: dict, work: Path) -> list[dict]:
    """vLLM's offline throughput of the dense checkpoint (as it is) and the vLLM recipe's (exported as
    nemotron-nas), all in one run of the driver."""
    from pruneflow.model.deci import export_vllm

    served = {}
    for name, (path, info) in models.items():
        if info["vllm"]:
            served[name] = path if name == "dense" else export_vllm(path, work / f"{name}-vllm")["path"]
    job = work / f"{model_name}-vllm-job.json"
    job.write_text(json.dumps({"models": [str(p) for p in served.values()], "prompts": [], "max_tokens": 0,
                               "max_model_len": 256, "throughput": VLLM_LOAD}))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING"}
    done = subprocess.run([str(VLLM_PYTHON), str(ROOT / "benchmarks" / "vllm_driver.py"), str(job),
                           str(work / "vllm-out.json")], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"vLLM driver failed:\n{done.stderr[-3000:]}")
    results = json.loads((work / "vllm-out.json").read_text())
    rows = []
    for name, path in served.items():
        result = results[str(path)]
        if "error" in result:
            raise SystemExit(f"vLLM could not run {path}: {result['error']}")
        rows.append({"model": model_name, **models[name][1], "name": name, "engine": "vllm",
                     "vllm_tok_s": result["throughput_tok_s"]})
    return rows


def table(rows: list[dict]) -> str:
    """llama.cpp rows with speeds relative to the dense f16 file beside the ideal; vLLM rows after them."""
    lines = ["| model | recipe | ratio | GGUF | MiB | ppl (llama.cpp) | prefill ms | × (ideal) | decode tok/s | "
             "× (ideal) | k-quant fallbacks |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    engine = [r for r in rows if "quant" in r]
    for r in engine:
        base = next(d for d in engine if d["model"] == r["model"] and d["name"] == "dense" and d["quant"] == "f16")
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['achieved_ratio']:.0%} | {r['quant']} | {r['bytes'] / 2**20:.1f} | "
            f"{r['llama_cpp_ppl']:.2f} | {r['llama_cpp_prefill_ms']:.1f} | "
            f"{base['llama_cpp_prefill_ms'] / r['llama_cpp_prefill_ms']:.2f} ({base['flops'] / r['flops']:.2f}) | "
            f"{r['llama_cpp_decode_tok_s']:.0f} | "
            f"{r['llama_cpp_decode_tok_s'] / base['llama_cpp_decode_tok_s']:.2f} "
            f"({base['bytes_read'] / r['bytes_read']:.2f}) | {r['fallbacks']} |")
    served = [r for r in rows if r.get("engine") == "vllm"]
    if served:
        lines += ["", "| model | recipe (vLLM) | ratio | vLLM output tok/s | × (ideal) |", "|---|---|---:|---:|---:|"]
        for r in served:
            base = next(d for d in served if d["model"] == r["model"] and d["name"] == "dense")
            flops = next(d["flops"] for d in engine if d["model"] == r["model"] and d["name"] == r["name"]
                         and d["quant"] == "f16")
            base_flops = next(d["flops"] for d in engine if d["model"] == r["model"] and d["name"] == "dense"
                              and d["quant"] == "f16")
            lines.append(f"| {r['model']} | {r['recipe']} | {r['achieved_ratio']:.0%} | {r['vllm_tok_s']:.0f} | "
                         f"{r['vllm_tok_s'] / base['vllm_tok_s']:.2f} ({base_flops / flops:.2f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["reference", "reference-deep"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-vllm", action="store_true", help="llama.cpp rows only (no .venv-vllm)")
    parser.add_argument("--report", action="store_true", help="print the table of deploy.json, measure nothing")
    args = parser.parse_args()
    if args.report:
        print(table(json.loads(OUT.read_text())["rows"]))
        return
    if not args.no_vllm and not VLLM_PYTHON.exists():
        raise SystemExit(f"{VLLM_PYTHON} is missing: `make vllm` builds vLLM's venv (or pass --no-vllm)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pruneflow-deploy-") as tmp:
        for model_name in args.models:
            work = Path(tmp) / model_name
            work.mkdir()
            models = prune_all(model_name, work, args.threads)
            rows += llama_cpp_rows(model_name, models, work, args.threads)
            if not args.no_vllm:
                rows += vllm_rows(model_name, models, work)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    machine = {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads,
               "cpus": os.cpu_count(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
               "commit": commit.strip(), "command": "python benchmarks/deploy.py " + " ".join(sys.argv[1:])}
    OUT.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
