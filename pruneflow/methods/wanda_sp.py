"""Wanda-sp (structured Wanda, as in FLAP's ``prune_wanda_sp``): mean_i |W[i, j]| · ‖X_j‖₂.

Scored on the inputs of o_proj (per head: mean over its dims) and down_proj (per channel).
"""

from __future__ import annotations

import torch

from pruneflow import arch as A
from pruneflow.scores import Scores, collect_input_stats, per_head


def channel_importance(weight: torch.Tensor, input_l2: torch.Tensor) -> torch.Tensor:
    """(out, in) weight, (in,) ‖X_j‖₂ → (in,) mean over rows of |W[:, j]| · ‖X_j‖₂."""
    return weight.abs().double().mean(0) * input_l2


@torch.no_grad()
def score(model, spec, windows, **_) -> Scores:
    geo = A.geometry(model.config)
    attn_stats, mlp_stats = collect_input_stats(model, spec, windows)
    heads, channels = [], []
    for block, attn, mlp in zip(A.blocks(model, spec), attn_stats, mlp_stats):
        heads.append(per_head(channel_importance(A.get(block, spec.o).weight, attn.l2), geo.head_dim).float())
        channels.append(channel_importance(A.get(block, spec.down).weight, mlp.l2).float())
    return Scores(heads=heads, channels=channels)
