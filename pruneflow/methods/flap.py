"""FLAP (An et al. 2024), as its code (CASIA-IVA-Lab/FLAP, ``lib/prune.py:prune_flap``) does it.

Importance of input channel j of o_proj/down_proj is WIFV = Var_tokens(X_j) · ‖W[:, j]‖²; for o_proj it is
**squared** (FLAP's ``W_metric = metrics[...](...) ** 2`` for attention). Each layer's o_proj and down_proj
channel scores are z-scored separately (AL-AM's standardization, over the layer's channels), and a head's score
is the mean of its dimensions' z-scores. ``allocation: auto`` ranks heads and channels together across layers
(AL-AM), each unit counted by the parameters it removes (FLAP's 512/3 for a LLaMA-7B head against an MLP
channel, exact here for any geometry), and ``reconstruct: auto`` adds the removed units' mean contribution as a
bias (FLAP's ``compress(..., bias=True)``).

Differences, all below the z-scoring: the variance is the exact unbiased one over every calibration token
(FLAP's running estimate leaves out the first sample), and with GQA a head unit is a query head from every KV
group or a whole group (``prune.head_mode``; FLAP has no GQA).
"""

from __future__ import annotations

import torch

from pruneflow.methods.inputs import column_sums, from_input_channels
from pruneflow.selection.scores import Scores


def fluctuation(weight: torch.Tensor, input_var: torch.Tensor) -> torch.Tensor:
    """(out, in) weight, (in,) Var(X_j) → (in,) WIFV = Var(X_j) · ‖W[:, j]‖²."""
    return input_var * column_sums(weight, input_var.dtype, lambda w: w * w)


@torch.no_grad()
def score(model, spec, windows, runtime, **_) -> Scores:
    return from_input_channels(model, spec, windows, runtime, lambda weight, stats: fluctuation(weight, stats.var),
                               with_means=True, standardize=True,
                               attn_importance=lambda weight, stats: fluctuation(weight, stats.var) ** 2)
