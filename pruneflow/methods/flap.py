"""FLAP (An et al. 2024): fluctuation-based importance with bias compensation.

Importance of input channel j of o_proj/down_proj is Var_tokens(X_j) · ‖W[:, j]‖²; a head's score is the
mean over its dimensions of the channel scores z-scored per layer and module (the paper's AL-AM
standardization, done on channels before heads are averaged), so scores compare across layers. Removed
channels are replaced by their mean contribution, a bias.
"""

from __future__ import annotations

import torch

from pruneflow.scores import Scores, column_sums, from_input_channels


def fluctuation(weight: torch.Tensor, input_var: torch.Tensor) -> torch.Tensor:
    """(out, in) weight, (in,) Var(X_j) → (in,) Var(X_j) · ‖W[:, j]‖²."""
    return input_var * column_sums(weight, input_var.dtype, lambda w: w * w)


@torch.no_grad()
def score(model, spec, windows, runtime, **_) -> Scores:
    return from_input_channels(model, spec, windows, runtime, lambda weight, stats: fluctuation(weight, stats.var),
                               with_means=True, standardize=True)
