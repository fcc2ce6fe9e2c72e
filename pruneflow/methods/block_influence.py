"""ShortGPT's Block Influence: BI_l = mean over tokens of 1 − cos(h_in, h_out) of block l (depth pruning).

A block that barely changes its input (BI ≈ 0) is the first to go; scores are per whole block.
"""

from __future__ import annotations

import torch

from pruneflow.methods._hidden import boundary_distances
from pruneflow.scores import Scores


@torch.no_grad()
def score(model, spec, windows, runtime, **_) -> Scores:
    influence = boundary_distances(model, spec, windows, runtime, span=1, distance=lambda cos: 1 - cos)
    return Scores(heads=[], channels=[], layers=influence, comparable=True)
