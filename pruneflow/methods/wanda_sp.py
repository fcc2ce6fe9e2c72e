"""Wanda-sp (structured Wanda, as in FLAP's ``prune_wanda_sp``): mean_i |W[i, j]| · ‖X_j‖₂.

Scored on the inputs of o_proj (per head: mean over its dims) and down_proj (per channel).
"""

from __future__ import annotations

import torch

from pruneflow.methods.inputs import column_sums, from_input_channels
from pruneflow.selection.scores import Scores


def channel_importance(weight: torch.Tensor, input_l2: torch.Tensor) -> torch.Tensor:
    """(out, in) weight, (in,) ‖X_j‖₂ → (in,) mean over rows of |W[:, j]| · ‖X_j‖₂."""
    return column_sums(weight, input_l2.dtype, torch.abs) / weight.shape[0] * input_l2


@torch.no_grad()
def score(model, spec, windows, runtime, **_) -> Scores:
    return from_input_channels(model, spec, windows, runtime,
                               lambda weight, stats: channel_importance(weight, stats.l2))
