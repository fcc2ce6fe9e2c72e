"""Benchmark: prune a model several times larger than the memory budget, streamed, vs the in-memory path.

Builds once (seeded random init, cached in ``--model-dir``) a Llama of about 1.55B parameters in bf16 (3.1 GB of
weights, 1 GB shards; hidden 2048, 25 layers, 16 query / 4 KV heads, intermediate 8192, the reference
model's 4096-token tokenizer), then runs ``pruneflow prune`` twice as separate processes under
``/usr/bin/time -v``: in memory, and with ``--max-memory`` (default 512MiB). Reported: each run's peak RSS
(whole process) against the interpreter's baseline (the same libraries imported, no model) and the model's
weight bytes, wall seconds, and whether the two outputs are identical (plan and every tensor).

    python benchmarks/streaming.py [--method flap] [--ratio 0.3] [--max-memory 512MiB] [--windows 16]
                                   [--seqlen 128] [--threads 2] [--tiny]

``--tiny`` builds a 4-layer model (for a quick check of the script). Writes benchmarks/streaming.json (not with
``--tiny``) and prints a markdown table. Not a test.
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
TINY = dict(SHAPE, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path.home() / ".cache" / "pruneflow-bench" / "llama-1.5b")
    parser.add_argument("--method", default="flap")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--max-memory", default="512MiB")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/pruneflow-streaming-bench"))
    parser.add_argument("--tiny", action="store_true", help="a 4-layer model, to check the script")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "streaming.json")
    args = parser.parse_args()
    shape = TINY if args.tiny else SHAPE
    model_dir = args.model_dir.with_name(args.model_dir.name + "-tiny") if args.tiny else args.model_dir
    build(model_dir, shape)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    baseline = timed([sys.executable, "-c", "import torch, transformers, accelerate, safetensors; "
                      "import pruneflow.cli, pruneflow.prune, pruneflow.checkpoint, pruneflow.calibration"], env)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    rows = {}
    for mode in ("memory", "streamed"):
        out = args.work / mode
        cmd = [sys.executable, "-m", "pruneflow.cli", "prune", str(model_dir), "--out", str(out),
               "--method", args.method, "--ratio", str(args.ratio), "--calibration", "corpus",
               "--n-calibration", str(args.windows), "--seqlen", str(args.seqlen), "--max-shard-size", "1GB"]
        if mode == "streamed":
            cmd += ["--max-memory", args.max_memory]
        print(f"{mode}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        rows[mode] = timed(cmd, env)
    plans = [json.loads((args.work / m / "plan.json").read_text()) for m in rows]
    equal = plans[0] == plans[1] and tensors_equal(args.work / "memory", args.work / "streamed")
    import torch

    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")},
        "model": {**shape, "weight_bytes": weights, "parameters": weights // 2},
        "method": args.method, "ratio": args.ratio, "max_memory": args.max_memory,
        "calibration": f"{args.windows} × {args.seqlen}", "baseline_rss": baseline["peak_rss"],
        "runs": rows, "identical_outputs": equal,
    }
    if not args.tiny:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


def table(result: dict) -> str:
    weights, base = result["model"]["weight_bytes"], result["baseline_rss"]
    lines = ["| run | peak RSS GB | above baseline, × weights | seconds | × in-memory time |",
             "|---|---:|---:|---:|---:|"]
    memory = result["runs"]["memory"]
    for mode, run in result["runs"].items():
        label = "in memory" if mode == "memory" else f"streamed, --max-memory {result['max_memory']}"
        lines.append(f"| {label} | {run['peak_rss'] / 1e9:.2f} | {(run['peak_rss'] - base) / weights:.2f} | "
                     f"{run['seconds']:.0f} | {run['seconds'] / memory['seconds']:.2f} |")
    lines.append(f"\nweights {weights / 1e9:.2f} GB; interpreter baseline {base / 1e9:.2f} GB; "
                 f"identical outputs: {result['identical_outputs']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
