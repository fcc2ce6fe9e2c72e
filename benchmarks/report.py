"""Render benchmarks/results.json into BENCHMARKS.md tables and a perplexity-vs-parameters plot."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path


def _name(row: dict) -> str:
    if row.get("bonsai"):
        return "bonsai (" + ", ".join(f"{k}={v}" for k, v in sorted(row["bonsai"].items())) + ")"
    return row["method"] + ("" if row.get("compensate", True) or row["method"] != "flap" else " (no bias comp.)")


def _aggregate(rows: list[dict]) -> list[dict]:
    """Average the seeds of each (method, ratio, allocation); keep the spread of perplexity."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(_name(row), row["ratio"], row["allocation"], row["model"])].append(row)
    out = []
    for (name, ratio, allocation, _), members in groups.items():
        merged = {k: v for k, v in members[0].items()}
        for key in ("test_ppl", "fidelity", "score_seconds", "decode_tok_s", "prefill_ms", "peak_rss_mb",
                    "achieved_ratio", "dense_decode_tok_s", "dense_prefill_ms"):
            values = [m[key] for m in members if key in m]
            if values:
                merged[key] = statistics.mean(values)
                merged[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        merged["seeds"] = len(members)
        merged["name"] = name
        out.append(merged)
    return out


def _lm_table(rows: list[dict], dense: dict) -> str:
    lines = ["| method | allocation | target | achieved | non-emb params | test ppl | score s | peak RSS MB "
             "| prefill ms (speed-up) | decode tok/s (speed-up) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines.append(f"| dense | – | 0% | 0% | {dense['non_embedding_params']:,} | {dense['test_ppl']:.2f} | – | "
                 f"{dense['peak_rss_mb']:.0f} | {dense['prefill_ms']:.1f} | {dense['decode_tok_s']:.0f} |")
    for r in sorted(rows, key=lambda r: (r["ratio"], r["allocation"], r["test_ppl"])):
        spread = f" ± {r['test_ppl_sd']:.1f}" if r.get("test_ppl_sd") else ""
        seeds = f" ({r['seeds']} seeds)" if r["seeds"] > 1 else ""
        lines.append(
            f"| {r['name']}{seeds} | {r['allocation']} | {r['ratio']:.0%} | {r['achieved_ratio']:.1%} | "
            f"{r['non_embedding_params']:,} | {r['test_ppl']:.2f}{spread} | {r['score_seconds']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['prefill_ms']:.1f} ({r['dense_prefill_ms'] / r['prefill_ms']:.2f}) | "
            f"{r['decode_tok_s']:.0f} ({r['decode_tok_s'] / r['dense_decode_tok_s']:.2f}) |")
    return "\n".join(lines)


def _encoder_table(rows: list[dict]) -> str:
    lines = ["| method | target | achieved | non-emb params | cosine to dense |", "|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["ratio"], -r["fidelity"])):
        lines.append(f"| {r['name']} | {r['ratio']:.0%} | {r['achieved_ratio']:.1%} | "
                     f"{r['non_embedding_params']:,} | {r['fidelity']:.4f} |")
    return "\n".join(lines)


def _plot(rows: list[dict], dense: dict, path: Path) -> None:
    from pruneflow.report import save_ppl_plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    series: dict[str, list] = defaultdict(list)
    for r in rows:
        series[f"{r['name']} ({r['allocation']})"].append(
            (r["non_embedding_params"] / dense["non_embedding_params"], r["test_ppl"]))
    colors = plt.get_cmap("tab20").colors
    for i, (name, points) in enumerate(sorted(series.items())):
        points = sorted(points + [(1.0, dense["test_ppl"])])
        ax.plot(*zip(*points), marker="o", label=name, color=colors[i % len(colors)],
                linestyle="--" if "uniform" in name else "-")
    save_ppl_plot(fig, ax, "non-embedding parameters kept (fraction of dense)", path, legend_size=7, dpi=110)


def write_report(results: Path, markdown: Path) -> None:
    data = json.loads(results.read_text())
    rows = _aggregate(data["rows"])
    lm = [r for r in rows if "reference" in r["model"] and r["method"] != "dense"]
    dense = next(r for r in rows if r["method"] == "dense")
    encoder = [r for r in rows if "minilm" in r["model"]]
    _plot(lm, dense, results.parent / "ppl_vs_params.png")
    m = data["machine"]
    text = markdown.read_text() if markdown.exists() else ""
    head, _, _ = text.partition("<!-- results -->")
    body = f"""<!-- results -->
Machine: {m['processor']}, {m['cpus']} CPUs, {m['threads']} torch threads, Python {m['python']}, torch
{m['torch']}, {m['platform']}; measured {m['date']} with `python benchmarks/methods.py`.

### Reference model (test split, {len(lm)} configurations)

{_lm_table(lm, dense)}

![perplexity vs parameters kept](benchmarks/ppl_vs_params.png)

### Packaged encoder (all-MiniLM-L6-v2): sentence-embedding fidelity

{_encoder_table(encoder) if encoder else "(not run)"}
"""
    markdown.write_text(head + body)
