"""Benchmark: prune a model several times larger than the memory budget, streamed, vs the in-memory path.

Two cases, each model built once (seeded random init, bf16, 1 GB shards, the reference model's 4096-token
tokenizer; cached under ``--cache``):
- ``flap``: a Llama of about 1.55B parameters (3.1 GB of weights; hidden 2048, 25 layers, 16 query / 4 KV
  heads, intermediate 8192), FLAP −30%, calibration 16 × 128 tokens, ``--max-memory 512MiB``;
- ``bonsai``: a Llama of about 310M parameters (0.62 GB; hidden 1024, 20 layers, 8 / 2 heads, intermediate
  4096), Bonsai ``fast`` with 16 sub-models on 4 windows, −10% (two iterations), calibration 8 × 128,
  ``--max-memory 160MiB``.
Each case runs ``pruneflow prune`` twice as separate processes under ``/usr/bin/time -v``: in memory, and
streamed. Reported: each run's peak RSS (whole process) against the interpreter's baseline (the same libraries
imported, no model), against a `pruneflow calibrate` run of the same windows (tokenizer and corpus, no model)
and the model's weight bytes, wall seconds, and whether the two outputs are identical (plan and every tensor).

    python benchmarks/streaming.py [--cases flap bonsai] [--threads 2] [--tiny]

``--tiny`` builds 4-layer models (a quick check of the script). Writes benchmarks/streaming.json (not with
``--tiny``) and prints markdown tables. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=25, num_attention_heads=16,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
SMALL = dict(SHAPE, hidden_size=1024, intermediate_size=4096, num_hidden_layers=20, num_attention_heads=8,
             num_key_value_heads=2)
TINY = dict(SHAPE, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)
CASES = {
    "flap": {"shape": SHAPE, "name": "llama-1.5b", "max_memory": "512MiB", "windows": 16, "seqlen": 128,
             "args": ["--method", "flap", "--ratio", "0.3"]},
    "bonsai": {"shape": SMALL, "name": "llama-310m", "max_memory": "160MiB", "windows": 8, "seqlen": 128,
               "args": ["--method", "bonsai", "--ratio", "0.1", "--set", "score.bonsai.preset=fast",
                        "--set", "score.bonsai.sub_models=16", "--set", "score.bonsai.n_windows=4"]},
}


def build(out: Path, shape: dict) -> Path:
    """A seeded random-init bf16 Llama with the reference tokenizer, saved in 1 GB shards (once)."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    reference = ROOT / "models" / "reference"
    vocab = json.loads((reference / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(LlamaConfig(**shape, vocab_size=vocab)).eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(reference / name, tmp / name)
    tmp.rename(out)
    return out


def timed(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: peak RSS (bytes) and wall seconds."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024
    return {"peak_rss": peak, "seconds": wall}


def tensors_equal(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    def names(path: Path) -> dict[str, Path]:
        out = {}
        for file in path.glob("*.safetensors"):
            with safe_open(file, framework="pt") as f:
                out.update(dict.fromkeys(f.keys(), file))
        return out

    left, right = names(a), names(b)
    if left.keys() != right.keys():
        return False
    for name in left:  # a tensor at a time: the two outputs are not both held
        with safe_open(left[name], framework="pt") as f, safe_open(right[name], framework="pt") as g:
            if not f.get_tensor(name).equal(g.get_tensor(name)):
                return False
    return True


def run_case(name: str, case: dict, args, env: dict, baseline: int) -> dict:
    shape = TINY if args.tiny else case["shape"]
    model_dir = build(args.cache / (case["name"] + ("-tiny" if args.tiny else "")), shape)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    max_memory = "40MiB" if args.tiny else case["max_memory"]
    work = args.work / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    calibration = timed([sys.executable, "-m", "pruneflow.cli", "calibrate", str(model_dir), "--out",
                         str(work / "calibration"), "--source", "corpus", "--n-windows", str(case["windows"]),
                         "--seqlen", str(case["seqlen"])], env)["peak_rss"]  # tokenizer + corpus, no model
    runs = {}
    for mode in ("memory", "streamed"):
        cmd = [sys.executable, "-m", "pruneflow.cli", "prune", str(model_dir), "--out", str(work / mode),
               *case["args"], "--calibration", "corpus", "--n-calibration", str(case["windows"]),
               "--seqlen", str(case["seqlen"]), "--max-shard-size", "1GB", "--state-dir", str(work / f".{mode}")]
        if mode == "streamed":
            cmd += ["--max-memory", max_memory]
        print(f"{name} {mode}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        runs[mode] = timed(cmd, env)
    plans = [json.loads((work / m / "plan.json").read_text()) for m in runs]
    equal = plans[0] == plans[1] and tensors_equal(work / "memory", work / "streamed")
    return {"model": {**shape, "weight_bytes": weights, "parameters": weights // 2},
            "command": case["args"], "max_memory": max_memory, "calibration": f"{case['windows']} × {case['seqlen']}",
            "baseline_rss": baseline, "calibration_rss": calibration, "runs": runs, "identical_outputs": equal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "pruneflow-bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/pruneflow-streaming-bench"))
    parser.add_argument("--tiny", action="store_true", help="4-layer models, to check the script")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "streaming.json")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    baseline = timed([sys.executable, "-c", "import torch, transformers, accelerate, safetensors; "
                      "import pruneflow.cli, pruneflow.prune, pruneflow.model.checkpoint, pruneflow.data.calibration"],
                     env)["peak_rss"]
    import torch

    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}, "cases": {}}
    for name in args.cases:
        results["cases"][name] = run_case(name, CASES[name], args, env, baseline)
        print(f"\n{name}\n" + table(results["cases"][name]), flush=True)
    if not args.tiny:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


def table(result: dict) -> str:
    weights, base, calib = result["model"]["weight_bytes"], result["baseline_rss"], result["calibration_rss"]
    lines = ["| run | peak RSS GB | above baseline, × weights | above calibration alone, × weights | seconds "
             "| × in-memory time |", "|---|---:|---:|---:|---:|---:|"]
    memory = result["runs"]["memory"]
    for mode, run in result["runs"].items():
        label = "in memory" if mode == "memory" else f"streamed, --max-memory {result['max_memory']}"
        lines.append(f"| {label} | {run['peak_rss'] / 1e9:.2f} | {(run['peak_rss'] - base) / weights:.2f} | "
                     f"{(run['peak_rss'] - calib) / weights:.2f} | {run['seconds']:.0f} | "
                     f"{run['seconds'] / memory['seconds']:.2f} |")
    lines.append(f"\nweights {weights / 1e9:.2f} GB; interpreter baseline {base / 1e9:.2f} GB; calibration alone "
                 f"(tokenizer, corpus, windows) {calib / 1e9:.2f} GB; identical outputs: {result['identical_outputs']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
