"""What pruneflow ships with it: the corpus (``data/corpus``) and the reference model (``models/reference``).

In a checkout they are those folders beside the package; an installed wheel carries them inside it, under
``pruneflow/_data/`` (pyproject.toml maps them), so calibration, evaluation and ``pruneflow demo`` work from any
directory.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # pruneflow/ (this module lives in pruneflow/data/)
REFERENCE = "models/reference"  # params.yaml's default model
CORPUS = "data/corpus"


def path(relative: str) -> Path:
    """The shipped folder ``relative`` (``data/corpus``, ``models/reference``): the wheel's copy, else the
    checkout's."""
    inside = PACKAGE / "_data" / relative
    return inside if inside.is_dir() else PACKAGE.parent / relative
