"""Render benchmarks/results.json into BENCHMARKS.md tables and a perplexity-vs-parameters plot."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path


def _name(row: dict) -> str:
    if row.get("bonsai"):
        return "bonsai (" + ", ".join(f"{k}={v}" for k, v in sorted(row["bonsai"].items())) + ")"
    from benchmarks.methods import reconstruction

    rec = reconstruction(row)
    if row["method"] == "flap":
        return "flap" + ("" if rec == "bias" else " (no bias comp.)" if rec == "none" else f" ({rec})")
    return row["method"] + ("" if rec == "none" else f" ({rec})")


def method_label(method: str, depth: dict | None) -> str:
    """A table's method column: ``method``, after whole blocks removed by a depth method first (``depth``:
    ``{"method", "blocks"}``) for a depth-then-width row."""
    if not depth:
        return method
    return f"{depth['method']} −{depth['blocks']} block{'s' if depth['blocks'] > 1 else ''}, then {method}"


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
        merged["params_per_seed"] = [m["non_embedding_params"] for m in members if "non_embedding_params" in m]
        merged["name"] = name
        out.append(merged)
    return out


def _params(row: dict) -> str:
    """Non-embedding parameters; an aggregated row gives each seed's count (the same count once, "each")."""
    counts = row.get("params_per_seed") or [row["non_embedding_params"]]
    if len(counts) == 1:
        return f"{counts[0]:,}"
    if len(set(counts)) == 1:
        return f"{counts[0]:,} (each seed)"
    return " / ".join(f"{c:,}" for c in counts)


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
            f"{_params(r)} | {r['test_ppl']:.2f}{spread} | {r['score_seconds']:.1f} | "
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
    from pruneflow.evaluation.report import save_ppl_plot
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


def _reconstruct_table(rows: list[dict]) -> str:
    """Per model, method, allocation and ratio: test perplexity with each reconstruction, its prune seconds and
    the peak RSS as a multiple of the model's dense inference row."""
    modes = ["none", "bias", "lstsq"]
    dense = {Path(r["model"]).name: r for r in rows if r["method"] == "dense"}  # by name: rows from any checkout
    cells: dict[tuple, dict] = defaultdict(dict)
    for r in rows:
        if r["method"] == "dense":
            continue
        rec = r.get("reconstruct") or "none"
        method = r["method"] + (f" ({r['bonsai']['preset']})" if r.get("bonsai", {}).get("preset") else "")
        method += " (hidden)" if "hidden" in r.get("units", []) else ""
        method += f" (objective {r['objective']})" if r.get("objective", "auto") != "auto" else ""
        method = method_label(method, r.get("depth"))  # depth first, then this method to the same total
        cells[(Path(r["model"]).name, method, r["allocation"], r["ratio"])][rec] = r
    lines = ["| model | method | allocation | target | " + " | ".join(f"ppl {m}" for m in modes)
             + " | achieved (lstsq) | prune s none / lstsq | peak RSS ÷ inference (lstsq) |",
             "|---|---|---|---:|" + "---:|" * len(modes) + "---:|---:|---:|"]
    for key in sorted(cells, key=lambda k: (k[0], k[3], k[1], k[2])):
        model, method, allocation, ratio = key
        row = cells[key]
        ppl = [f"{row[m]['test_ppl']:.2f}" if m in row else "–" for m in modes]
        best = min((row[m]["test_ppl"], m) for m in row)[1]
        ppl = [f"**{p}**" if m == best else p for p, m in zip(ppl, modes)]
        ref = row.get("lstsq") or next(iter(row.values()))
        base = dense.get(model)
        seconds = " / ".join(f"{row[m]['prune_seconds']:.1f}" if m in row else "–" for m in ("none", "lstsq"))
        memory = f"{ref['peak_rss_mb'] / base['peak_rss_mb']:.2f}" if base else "–"
        lines.append(f"| {model} | {method} | {allocation} | {ratio:.0%} | " + " | ".join(ppl)
                     + f" | {ref['achieved_ratio']:.1%} | {seconds} | {memory} |")
    dense_line = "; ".join(f"{m} {r['test_ppl']:.2f} ({r['peak_rss_mb']:.0f} MB)" for m, r in dense.items())
    return "\n".join(lines) + f"\n\nDense test perplexity (peak RSS of inference): {dense_line}."


def write_reconstruct(results: Path, markdown: Path) -> None:
    """Rewrite the reconstruction table of BENCHMARKS.md (between its ``reconstruct`` markers)."""
    data = json.loads(results.read_text())
    m = data["machine"]
    commands = sorted({(r.get("commit", "?"), r.get("command", "?")) for r in data["rows"]})
    produced = "; ".join(f"`{command}` at commit {commit}" for commit, command in commands)
    table = (f"Measured {m['date']} ({m['processor']}, {m['cpus']} CPUs, {m['threads']} torch threads per job, "
             f"{m.get('parallel', 1)} jobs at once, torch {m['torch']}) by {produced}; every row of "
             f"`benchmarks/{results.name}` records its commit and command. Bold: the best reconstruction of the row."
             f"\n\n" + _reconstruct_table(data["rows"]))
    text = markdown.read_text()
    start, end = "<!-- reconstruct -->", "<!-- /reconstruct -->"
    if start not in text:
        raise SystemExit(f"{markdown} has no {start} … {end} section")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    markdown.write_text(f"{head}{start}\n{table}\n{end}{tail}")


if __name__ == "__main__":
    import sys

    write_reconstruct(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else Path("BENCHMARKS.md"))
