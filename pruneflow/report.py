"""Comparison tables of runs: one row per model (dense, pruned, recovered) or per run of a sweep.

Input rows are the evaluate stage's ``metrics.json`` dicts, so a table renders the same from local files,
from MLflow artifacts or from a sweep's member runs.
"""

from __future__ import annotations

import math

COLUMNS = [  # (header, key in a model's row, format)
    ("params", "params", "{:,}"),
    ("size MB", "size_mb", "{:.1f}"),
    ("test ppl", "test_ppl", "{:.2f}"),
    ("prefill ms", "prefill_ms", "{:.1f}"),
    ("decode tok/s", "decode_tok_s", "{:.0f}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return fmt.format(value)


def model_rows(label: str, metrics: dict) -> list[tuple[str, dict]]:
    """(label, row) for each model one evaluate stage measured, dense first."""
    return [(f"{label} {name}".strip(), metrics[name]) for name in ("dense", "pruned", "recovered") if name in metrics]


def run_table(runs: dict[str, dict]) -> str:
    """A markdown table of several runs: {label: metrics.json}; the dense row is shown once (from the first
    run) when every run pruned the same model."""
    header = ["model", "ratio", *(h for h, _, _ in COLUMNS), "ppl ÷ dense", "gates"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    dense_shown = False
    for label, metrics in runs.items():
        for name, row in model_rows("", metrics):
            if name == "dense":
                if dense_shown:
                    continue
                dense_shown, title, ratio, vs, gates = True, "dense", "0", "1.00", ""
            else:
                title = f"{label} {name}"
                ratio = f"{metrics.get('achieved_ratio', float('nan')):.3f}"
                dense_ppl = metrics["dense"].get("test_ppl")
                vs = f"{row['test_ppl'] / dense_ppl:.2f}" if dense_ppl and "test_ppl" in row else "–"
                final = name == metrics.get("final", "pruned")
                gates = ("pass" if metrics.get("gates_passed") else "fail") if final else ""
            cells = [title, ratio, *(_cell(row, key, fmt) for _, key, fmt in COLUMNS), vs, gates]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
