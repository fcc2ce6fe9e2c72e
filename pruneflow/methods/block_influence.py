"""ShortGPT's Block Influence: BI_l = mean over tokens of 1 − cos(h_in, h_out) of block l (depth pruning).

A block that barely changes its input (BI ≈ 0) is the first to go; scores are per whole block.
"""

from __future__ import annotations

import torch

from pruneflow import arch as A
from pruneflow.methods._hidden import boundary_states, cosine
from pruneflow.scores import Scores


@torch.no_grad()
def score(model, spec, windows, **_) -> Scores:
    n_layers = len(A.blocks(model, spec))
    total = torch.zeros(n_layers, dtype=torch.float64)
    tokens = 0
    for states in boundary_states(model, spec, windows):
        for layer in range(n_layers):
            total[layer] += (1 - cosine(states[layer], states[layer + 1])).sum()
        tokens += states[0].shape[0] * states[0].shape[1]
    return Scores(heads=[], channels=[], layers=total / tokens, comparable=True)
