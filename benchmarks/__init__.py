"""Benchmark scripts (run by hand, `python benchmarks/NAME.py`; not tests)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def provenance() -> dict[str, str]:
    """What produced a result: the checkout's short commit and this process's command line, as
    ``python benchmarks/NAME.py ARGS``."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    script = Path(sys.argv[0]).resolve()
    name = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return {"commit": commit, "command": " ".join(["python", str(name), *sys.argv[1:]])}


def write_results(out: Path, rows: list[dict], threads: int, date: str, **machine) -> None:
    """``{"machine": …, "rows": …}`` to ``out``, every row stamped with :func:`provenance`."""
    import torch

    produced = provenance()
    for row in rows:
        row.update(produced)
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "threads": threads, "torch": torch.__version__, "date": date, **machine}
    out.write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
