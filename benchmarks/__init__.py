"""Benchmark scripts (run by hand, `python benchmarks/NAME.py`; not tests)."""

from __future__ import annotations

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
