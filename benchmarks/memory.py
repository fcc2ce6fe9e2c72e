"""Benchmark: peak memory of every method as a ratio to an inference-only forward of the same batch.

Each measurement runs in its own process: the libraries are imported, the model is built (seeded random init)
or loaded, the peak is reset (Linux ``/proc/self/clear_refs``; ``torch.cuda.reset_peak_memory_stats`` on CUDA),
then either one inference-only forward of the methods' batch (``model(input_ids)`` with full logits, 8 × 256
tokens; Taylor's batch is 4) or the whole ``pruneflow.prune.prune`` call (score → select → apply) runs. Reported:
the peak above the process's memory before the model existed (libraries excluded), and the ratio
method / inference. On CUDA: ``torch.cuda.max_memory_allocated``. On the CPU, peak RSS twice: with glibc's
default allocator (what a user sees; its heap keeps freed blocks that neighbouring live ones pin, which adds up
over the many passes of Bonsai and SLEB), and with ``MALLOC_MMAP_THRESHOLD_=65536``, where every block of 64 KiB
or more is its own mapping and goes back to the OS when freed, so RSS follows the live tensors (slower: each
large tensor faults its pages in again).

    python benchmarks/memory.py [--models reference small-bf16] [--device cpu] [--threads 2]

Every measurement is the median of ``--repeats`` processes (3). Models: ``reference`` (the committed 8M fp32
Llama) and ``small-bf16`` (a 55M bf16 GQA Llama, random init,
hidden 512, 8 layers, 8 query / 2 KV heads, vocab 32000: weights dominate the libraries). Writes
benchmarks/memory.json and prints a markdown table. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["magnitude", "random", "wanda_sp", "flap", "taylor", "block_influence", "angular", "sleb", "bonsai"]
SMALL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=False)


def _model(name: str, runtime):
    import torch

    from pruneflow.model import arch as A
    from pruneflow.model import checkpoint

    if name == "reference":
        model, _, spec = checkpoint.load(ROOT / "models" / "reference", runtime, with_tokenizer=False)
        return model, spec
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with runtime.device:
            model = LlamaForCausalLM(LlamaConfig(**SMALL)).eval()
    finally:
        torch.set_default_dtype(default)
    return model, A.arch_for("llama")


def run_one(job: dict) -> dict:
    import torch

    from pruneflow.pipeline.params import BonsaiParams, PruneParams
    from pruneflow.prune import prune
    from pruneflow.execution.runtime import Runtime

    torch.set_num_threads(job["threads"])
    runtime = Runtime.create(job["device"])
    runtime.reset_peak()
    before = runtime.peak_bytes()["peak_bytes"] if runtime.device.type != "cuda" else 0
    model, spec = _model(job["model"], runtime)
    vocab = model.get_input_embeddings().num_embeddings
    windows = torch.randint(0, vocab, (job["windows"], 256), generator=torch.Generator().manual_seed(0))
    runtime.free()
    runtime.reset_peak()

    def phase():
        if job["method"] == "inference":
            with torch.no_grad():
                model(input_ids=windows[: job["batch"]].to(runtime.input_device(model)), use_cache=False)
        else:
            bonsai = BonsaiParams(preset="fast", sub_models=16, n_windows=8)
            ratio = 0.1 if job["method"] == "bonsai" else 0.3  # two Bonsai iterations: memory does not grow
            prune(model, spec, job["method"], PruneParams(ratio=ratio), windows, runtime=runtime,
                  options=bonsai if job["method"] == "bonsai" else None)
        runtime.synchronize()

    started = time.perf_counter()
    phase()
    peak = runtime.peak_bytes()
    return {**job, "seconds": time.perf_counter() - started, "peak_bytes": peak["peak_bytes"] - before,
            "measure": peak["measure"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["reference", "small-bf16"])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=16, help="calibration windows (memory is per batch)")
    parser.add_argument("--repeats", type=int, default=3, help="processes per measurement (the median is kept)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "memory.json")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))))
        return
    rows = []
    for model in args.models:
        methods = ["inference", *args.methods] + (["inference-4"] if "taylor" in args.methods else [])
        for method in methods:  # Taylor's own batch (4 windows) has its own inference reference
            job = {"model": model, "method": method.removesuffix("-4"), "device": args.device,
                   "threads": args.threads, "windows": args.windows,
                   "batch": 4 if method in ("taylor", "inference-4") else 8}
            print(f"{model} {method}", file=sys.stderr, flush=True)
            runs = [_subprocess(job) for _ in range(args.repeats)]
            row = sorted(runs, key=lambda r: r["peak_bytes"])[len(runs) // 2]  # the median run
            row["peak_bytes_runs"] = [r["peak_bytes"] for r in runs]
            if args.device == "cpu":
                mmap = sorted(_subprocess(job, {"MALLOC_MMAP_THRESHOLD_": "65536"})["peak_bytes"]
                              for _ in range(args.repeats))
                row["mmap_peak_bytes"], row["mmap_peak_bytes_runs"] = mmap[len(mmap) // 2], mmap
            rows.append(row)
    import torch

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d")}
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    print(table(rows))


def _subprocess(job: dict, env: dict | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"job failed: {job}\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def table(rows: list[dict]) -> str:
    mmap = all("mmap_peak_bytes" in r for r in rows)
    head = "| model | method | batch | peak MB (inference) | ratio |"
    lines = [head + (" peak MB, mmap allocator (inference) | ratio |" if mmap else "") + " seconds |",
             "|---|---|---:|---:|---:|" + ("---:|---:|" if mmap else "") + "---:|"]
    for row in rows:
        if row["method"] == "inference":
            continue
        ref = next(r for r in rows if r["model"] == row["model"] and r["method"] == "inference"
                   and r["batch"] == row["batch"])
        line = (f"| {row['model']} | {row['method']} | {row['batch']} × 256 | {row['peak_bytes'] / 1e6:,.0f} "
                f"({ref['peak_bytes'] / 1e6:,.0f}) | {row['peak_bytes'] / ref['peak_bytes']:.2f} |")
        if mmap:
            line += (f" {row['mmap_peak_bytes'] / 1e6:,.0f} ({ref['mmap_peak_bytes'] / 1e6:,.0f}) | "
                     f"{row['mmap_peak_bytes'] / ref['mmap_peak_bytes']:.2f} |")
        lines.append(line + f" {row['seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
