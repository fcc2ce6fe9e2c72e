"""FLAP (An et al. 2024): fluctuation-based importance with bias compensation.

Importance of input channel j of o_proj/down_proj is Var_tokens(X_j) · ‖W[:, j]‖²; a head's score is the
mean over its dimensions. Scores are standardized per layer and module before global allocation (the
``comparable=False`` contract), and removed channels are replaced by their mean contribution, a bias.
"""

from __future__ import annotations

import torch

from pruneflow import arch as A
from pruneflow.scores import Scores, collect_input_stats, per_head


def fluctuation(weight: torch.Tensor, input_var: torch.Tensor) -> torch.Tensor:
    """(out, in) weight, (in,) Var(X_j) → (in,) Var(X_j) · ‖W[:, j]‖²."""
    return input_var * weight.double().pow(2).sum(0)


@torch.no_grad()
def score(model, spec, windows, **_) -> Scores:
    geo = A.geometry(model.config)
    attn_stats, mlp_stats = collect_input_stats(model, spec, windows)
    heads, channels = [], []
    for block, attn, mlp in zip(A.blocks(model, spec), attn_stats, mlp_stats):
        heads.append(per_head(fluctuation(A.get(block, spec.o).weight, attn.var), geo.head_dim).float())
        channels.append(fluctuation(A.get(block, spec.down).weight, mlp.var).float())
    return Scores(heads=heads, channels=channels,
                  attn_mean=[s.mean.float() for s in attn_stats], mlp_mean=[s.mean.float() for s in mlp_stats])
