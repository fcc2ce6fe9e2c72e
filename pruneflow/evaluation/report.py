"""Comparison tables of runs: one row per model (dense, pruned, recovered) or per run of a sweep.

Input rows are the evaluate stage's ``metrics.json`` dicts, so a table renders the same from local files,
from MLflow artifacts or from a sweep's member runs.
"""

from __future__ import annotations

import math

from pruneflow.units import kept_of

COLUMNS = [  # (header, key in a model's row, format)
    ("params", "params", "{:,}"),
    ("size MB", "size_mb", "{:.1f}"),
    ("test ppl", "test_ppl", "{:.2f}"),
    ("prefill ms", "prefill_ms", "{:.1f}"),
    ("decode tok/s", "decode_tok_s", "{:.0f}"),
]
LLAMA_CPP_COLUMNS = [  # shown when a run measured them (evaluate.llama_cpp)
    ("llama.cpp prefill ms", "llama_cpp_prefill_ms", "{:.1f}"),
    ("llama.cpp decode tok/s", "llama_cpp_decode_tok_s", "{:.0f}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return fmt.format(value)


def model_rows(label: str, metrics: dict) -> list[tuple[str, dict]]:
    """(label, row) for each model one evaluate stage measured, dense first."""
    return [(f"{label} {name}".strip(), metrics[name]) for name in ("dense", "pruned", "recovered") if name in metrics]


def table_rows(runs: dict[str, dict]):
    """(title, model name, row, run metrics) for the tables: the dense model once (from the first run, as every
    run pruned the same model), then each run's pruned and recovered models."""
    dense_shown = False
    for label, metrics in runs.items():
        for name, row in model_rows("", metrics):
            if name == "dense" and dense_shown:
                continue
            dense_shown = dense_shown or name == "dense"
            yield ("dense" if name == "dense" else f"{label} {name}"), name, row, metrics


def run_table(runs: dict[str, dict]) -> str:
    """A markdown table of several runs: {label: metrics.json}."""
    measured = any("llama_cpp_prefill_ms" in row for _, _, row, _ in table_rows(runs))
    columns = COLUMNS + (LLAMA_CPP_COLUMNS if measured else [])
    header = ["model", "ratio", *(h for h, _, _ in columns), "ppl ÷ dense", "gates"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for title, name, row, metrics in table_rows(runs):
        if name == "dense":
            ratio, vs, gates = "0", "1.00", ""
        else:
            ratio = f"{metrics.get('achieved_ratio', float('nan')):.3f}"
            dense_ppl = metrics["dense"].get("test_ppl")
            vs = f"{row['test_ppl'] / dense_ppl:.2f}" if dense_ppl and "test_ppl" in row else "–"
            final = name == metrics.get("final", "pruned")
            gates = ("pass" if metrics.get("gates_passed") else "fail") if final else ""
        cells = [title, ratio, *(_cell(row, key, fmt) for _, key, fmt in columns), vs, gates]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pareto_plot(points: list[dict], out_png) -> None:
    """Test perplexity vs non-embedding parameters kept, one series per method with its Pareto frontier.

    ``points``: {"method", "params", "ppl"} per model (method "dense" for the unpruned model).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in sorted({p["method"] for p in points}):
        series = sorted((p["params"], p["ppl"]) for p in points if p["method"] == method)
        if method == "dense":
            ax.scatter(*zip(*series), marker="*", s=160, color="black", label="dense", zorder=3)
            continue
        frontier, best = [], math.inf
        for params, ppl in reversed(series):  # from most kept to least: keep points no larger model beats
            if ppl < best:
                frontier.append((params, ppl))
                best = ppl
        line = ax.plot(*zip(*sorted(frontier)), marker="o", label=method)[0]
        ax.scatter(*zip(*series), color=line.get_color(), alpha=0.35)
    save_ppl_plot(fig, ax, "non-embedding parameters kept", out_png)


def save_ppl_plot(fig, ax, xlabel: str, path, legend_size: int = 8, dpi: int = 120) -> None:
    """Finish a perplexity (log scale) plot and write it as a PNG."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("test perplexity (log)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def kept_heatmap(plan: dict, dense_widths: dict, out_png) -> None:
    """Share of query heads, KV heads and MLP channels (and of experts, for an experts plan) each layer keeps (a
    removed layer keeps 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = dense_widths["layers"]
    kept_units = kept_of(plan)  # a plan written with a field per unit reads the same
    kept_layers = kept_units.get("layers") or list(range(n_layers))
    rows = {"query heads": ("kept_heads", dense_widths["heads"]), "KV heads": ("kept_kv_heads", dense_widths["kv_heads"]),
            "MLP channels": ("kept_channels", dense_widths["channels"])}
    if kept_units.get("experts") and dense_widths.get("experts"):
        rows["experts"] = ("kept_experts", dense_widths["experts"])
    grid = [[0.0] * n_layers for _ in rows]
    for new_index, layer in enumerate(kept_layers):
        entry = plan["layers"][new_index] if len(plan["layers"]) == len(kept_layers) else plan["layers"][layer]
        entry = {**entry, "kept_experts": (kept_units.get("experts") or [None] * n_layers)[layer]}
        for r, (key, total) in enumerate(rows.values()):
            kept = entry.get(key)
            grid[r][layer] = 1.0 if kept is None else len(kept) / total
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * n_layers + 2), 0.6 * len(rows) + 0.6))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for r, row in enumerate(grid):
        for c, value in enumerate(row):
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 0.6 else "black")
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_xticks(range(n_layers), [str(i) for i in range(n_layers)])
    ax.set_xlabel("layer")
    ax.set_title(f"kept per layer: {plan.get('method')} −{plan['params']['achieved_ratio']:.1%}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def points_of(label: str, metrics: dict) -> list[dict]:
    """Pareto points of one run: its dense model and each pruned/recovered model with a test perplexity."""
    out = []
    for name, row in model_rows("", metrics):
        if "test_ppl" in row:
            method = "dense" if name == "dense" else f"{metrics.get('method', label)}" + (
                " + recovery" if name == "recovered" else "")
            out.append({"method": method, "params": row["non_embedding_params"], "ppl": row["test_ppl"]})
    return out


def write_report(out_dir, runs: dict[str, dict], plan: dict | None = None, dense_widths: dict | None = None) -> None:
    """report.md (the table + task scores) and ppl_vs_params.png; kept_per_layer.png when a plan is given."""
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = sorted({f"{m['ppl_text']['source']} ({m['ppl_text']['seqlen']}-token windows)"
                    for m in runs.values() if isinstance(m.get("ppl_text"), dict)})
    where = f"Perplexity on {', '.join(texts)}.\n\n" if texts else ""
    text = "# pruneflow report\n\n" + where + run_table(runs) + task_table(runs)
    text += "\n![perplexity vs parameters](ppl_vs_params.png)\n"
    pareto_plot([p for label, m in runs.items() for p in points_of(label, m)], out_dir / "ppl_vs_params.png")
    if plan is not None and dense_widths is not None:
        kept_heatmap(plan, dense_widths, out_dir / "kept_per_layer.png")
        text += "\n![kept heads and channels per layer](kept_per_layer.png)\n"
    (out_dir / "report.md").write_text(text)


def task_table(runs: dict[str, dict]) -> str:
    """Task accuracies (lm-eval headline metric) per model, when the runs measured any."""
    tasks = sorted({t for m in runs.values() for name, row in model_rows("", m) for t in row.get("tasks", {})})
    if not tasks:
        return ""
    lines = ["", "| model | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for title, _, row, _ in table_rows(runs):
        scores = row.get("tasks", {})
        lines.append(f"| {title} | " + " | ".join(
            "–" if scores.get(t) is None else f"{scores[t]:.3f}" for t in tasks) + " |")
    return "\n".join(lines) + "\n"
