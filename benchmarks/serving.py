"""Benchmark: pruned models in llama.cpp (llama-cpp-python) — agreement with transformers and speed.

For each committed reference model: the dense model and each method × ratio (each method's own settings, as
`pruneflow prune` runs them) are exported with `pruneflow export gguf` (f32), then measured in llama.cpp:
- test perplexity (transformers, the packaged test split, 256-token windows), as the pruning left it;
- agreement: tokenization of the first 20 test documents equal to transformers', and the largest logit
  difference to transformers over the first 200 tokens of the first document (f32 KV cache);
- speed (``pruneflow.evaluation.evaluate.llama_cpp_speed``, what ``evaluate.llama_cpp`` runs): prefill of 256 tokens
  (ms) and greedy decode of 64 tokens after a 16-token prompt (tokens/s), on ``--threads`` threads, one
  warm-up round then ``--rounds`` (20) rounds round-robin over dense and pruned (the protocol of the transformers
  speed columns), medians; beside them the ideal, the ratio of non-embedding parameters;
- ONNX: ``pruneflow export onnx``'s own check, ONNX Runtime vs torch on a padded batch.

Writes ``benchmarks/serving.json`` (with commit and command) and prints a markdown table. Not a test: run
it by hand on an otherwise idle machine, ``python benchmarks/serving.py`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "serving.json"


def agreement(model, tokenizer, gguf: Path, docs: list[str], threads: int) -> dict:
    import numpy as np
    import torch

    from pruneflow.evaluation.evaluate import llama_cpp_engine

    llm = llama_cpp_engine(gguf, threads, logits_all=True)
    same = sum(llm.tokenize(d.encode(), add_bos=False, special=False) == tokenizer(d)["input_ids"] for d in docs)
    ids = tokenizer(docs[0])["input_ids"][:200]
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    llm.eval(ids)
    diff = float(np.abs(np.asarray(llm.scores[:len(ids)]) - reference).max())
    llm.close()
    return {"tokenization_equal": f"{same}/{len(docs)}", "max_logit_diff": diff, "tokens": len(ids)}


def run_model(name: str, configs: list[tuple[str, float]], threads: int, rounds: int, work: Path,
              round_to: int = 1) -> list[dict]:
    import torch

    from pruneflow.data import calibration as C
    from pruneflow.model import checkpoint
    from pruneflow.data import corpus
    from pruneflow.model.arch import count_parameters
    from pruneflow.evaluation.evaluate import llama_cpp_speed, perplexity
    from pruneflow.model.export import export_gguf, export_onnx
    from pruneflow.methods import METHODS
    from pruneflow.pipeline.params import PruneParams
    from pruneflow.prune import prune
    from pruneflow.execution.runtime import Runtime

    torch.set_num_threads(threads)
    runtime = Runtime.create("cpu", "auto")
    source = ROOT / "models" / name
    test = corpus.load_split("test")
    docs = test[:20]
    dense, tokenizer, spec = checkpoint.load(source, runtime)
    stream = C.token_stream(tokenizer, test)
    dense_params = count_parameters(dense)["non_embedding"]
    dense_gguf = work / f"{name}-dense.gguf"
    dense_summary = export_gguf(source, dense_gguf, "f32")
    rows = []
    for method, ratio in configs:
        model, _, _ = checkpoint.load(source, runtime)
        windows, _ = C.prepare(tokenizer, "corpus", 64, 256, 0, model.config.max_position_embeddings)
        units = ["layers"] if METHODS[method].depth else ["channels", "heads"]
        cfg = PruneParams(ratio=ratio, units=units, round_to=1 if METHODS[method].depth else round_to)
        result = prune(model, spec, method, cfg, windows, runtime=runtime)
        out = work / f"{name}-{method}-{round(ratio * 100)}pct"
        checkpoint.save(model, tokenizer, out, spec)
        summary = export_gguf(out, out.with_suffix(".gguf"), "f32")
        row = {"model": name, "method": method, "ratio": ratio, "allocation": result.plan.allocation,
               "reconstruct": result.plan.reconstruct, "round_to": cfg.round_to,
               "architecture": summary["architecture"],
               "dense_architecture": dense_summary["architecture"],
               "achieved_ratio": result.plan.params["achieved_ratio"],
               "test_ppl": perplexity(model, stream, 256, runtime=runtime),
               "ideal_speedup": dense_params / count_parameters(model)["non_embedding"],
               "gguf_mb": summary["bytes"] / 2**20, "dense_gguf_mb": dense_summary["bytes"] / 2**20,
               **agreement(model, tokenizer, out.with_suffix(".gguf"), docs, threads),
               "onnx_max_diff": export_onnx(out, work / f"{out.name}-onnx")["onnxruntime_max_diff"]}
        pruned_speed, dense_speed = llama_cpp_speed([out.with_suffix(".gguf"), dense_gguf], len(tokenizer),
                                                    threads, rounds=rounds)
        row.update(prefill_ms=pruned_speed["llama_cpp_prefill_ms"],
                   decode_tok_s=pruned_speed["llama_cpp_decode_tok_s"],
                   dense_prefill_ms=dense_speed["llama_cpp_prefill_ms"],
                   dense_decode_tok_s=dense_speed["llama_cpp_decode_tok_s"])
        print(f"{name} {method} {ratio}: {row}", file=sys.stderr, flush=True)
        rows.append(row)
        del model
    rows.insert(0, {"model": name, "method": "dense", "ratio": 0.0, "architecture": dense_summary["architecture"],
                    "test_ppl": perplexity(dense, stream, 256, runtime=runtime),
                    **agreement(dense, tokenizer, dense_gguf, docs, threads)})
    return rows


def _ppl(row: dict) -> str:
    return f"{row['test_ppl']:.2f}" if "test_ppl" in row else "–"


def table(rows: list[dict]) -> str:
    lines = ["| model | method · allocation · reconstruct | target | test ppl | GGUF arch | GGUF MB (dense) | "
             "prefill ms (speed-up) | decode tok/s (speed-up) | ideal (params) | tokens equal | max logit diff | "
             "ONNX diff |", "|---|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        if r["method"] == "dense":
            lines.append(f"| {r['model']} | dense | – | {_ppl(r)} | {r['architecture']} | – | – | – | – | "
                         f"{r['tokenization_equal']} | {r['max_logit_diff']:.1e} | – |")
            continue
        lines.append(
            f"| {r['model']} | {r['method']} · {r['allocation']} · {r['reconstruct']}"
            f"{f' · round_to {rt}' if (rt := r.get('round_to', 1)) > 1 else ''} | {r['ratio']:.0%} | {_ppl(r)} | "
            f"{r['architecture']} | {r['gguf_mb']:.1f} ({r['dense_gguf_mb']:.1f}) | "
            f"{r['prefill_ms']:.2f} ({r['dense_prefill_ms'] / r['prefill_ms']:.2f}×) | "
            f"{r['decode_tok_s']:.0f} ({r['decode_tok_s'] / r['dense_decode_tok_s']:.2f}×) | "
            f"{r['ideal_speedup']:.2f}× | {r['tokenization_equal']} | {r['max_logit_diff']:.1e} | "
            f"{r['onnx_max_diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["reference", "reference-deep"])
    parser.add_argument("--methods", nargs="+", default=["flap", "wanda_sp", "block_influence"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.5])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--round-to", type=int, default=1,
                        help="prune.round_to of the width methods: MLP widths kept a multiple of this")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="print the table of --out's rows and exit (no runs)")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())["rows"]))
        return
    configs = [(m, r) for m in args.methods for r in args.ratios]
    started = time.strftime("%Y-%m-%d")
    with tempfile.TemporaryDirectory(prefix="pruneflow-serving-") as tmp:
        rows = [row for name in args.models for row in run_model(name, configs, args.threads, args.rounds,
                                                                 Path(tmp), args.round_to)]
    import llama_cpp

    from benchmarks import write_results

    write_results(args.out, rows, args.threads, started, llama_cpp_python=llama_cpp.__version__)
    print(table(rows))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
