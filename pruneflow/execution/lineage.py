"""A model's lineage: where it was loaded from and every plan applied to it since, so that a replica on another
process or host can rebuild the same model (:mod:`pruneflow.execution.replicas`). ``checkpoint.load`` and
``apply`` write it; a change no plan records (a least-squares re-fit, merged LoRA adapters) marks it not
replayable. Imports nothing of pruneflow's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn


@dataclass
class Lineage:
    path: str  # the checkpoint directory on the driver's node
    pinned: str | None  # ORG/NAME@commit for a hub model (a worker on another node resolves it in its cache)
    stream: bool
    calibration: tuple[int, int]
    applied: list = field(default_factory=list)  # (plan, scores) in the order apply saw them
    replayable: bool = True
    why: str = ""  # why not replayable

    def key(self) -> str:
        digest = hashlib.sha256(f"{self.path}|{self.pinned}|{self.stream}|{self.calibration}".encode())
        for plan, _ in self.applied:
            digest.update(plan.to_json().encode())
        return digest.hexdigest()


def note_origin(model: nn.Module, source, stream: bool, calibration: tuple[int, int]) -> None:
    """``checkpoint.load`` made ``model`` from ``source`` (a ModelSource)."""
    pinned = source.pinned if getattr(source, "repo_id", None) and getattr(source, "commit", None) else None
    model.pruneflow_lineage = Lineage(str(Path(source.path).resolve()), pinned, stream, tuple(calibration))


def note_applied(model: nn.Module, plan, scores) -> None:
    """``apply`` sliced ``model`` by ``plan``."""
    lineage = getattr(model, "pruneflow_lineage", None)
    if lineage is not None:
        lineage.applied.append((plan, scores))


def note_changed(model: nn.Module, why: str) -> None:
    """``model``'s weights changed in a way no plan records: replicas can no longer rebuild it."""
    lineage = getattr(model, "pruneflow_lineage", None)
    if lineage is not None and lineage.replayable:
        lineage.replayable = False
        lineage.why = why


