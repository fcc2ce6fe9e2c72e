"""LLM-Pruner-style first-order Taylor importance: Σ |W ⊙ ∂L/∂W| over each unit's weights (needs gradients).

Head h: its q_proj rows and o_proj columns, plus an equal share of its KV head's k/v rows; MLP channel j:
its gate/up rows and down_proj column. The loss is the mean next-token loss over the calibration windows.
Unlike the forward-only methods this holds a gradient for every weight plus the activations of a backward
pass: about twice the model's weight memory on top of inference.
"""

from __future__ import annotations

import torch

from pruneflow import arch as A
from pruneflow.errors import PruneflowError
from pruneflow.scores import Scores


def _row_saliency(linear: torch.nn.Linear) -> torch.Tensor:
    """(out,) Σ_in |W ⊙ g| per output row (bias included)."""
    saliency = (linear.weight * linear.weight.grad).abs().sum(1)
    if linear.bias is not None:
        saliency = saliency + (linear.bias * linear.bias.grad).abs()
    return saliency.double()


def _column_saliency(linear: torch.nn.Linear) -> torch.Tensor:
    """(in,) Σ_out |W ⊙ g| per input column."""
    return (linear.weight * linear.weight.grad).abs().sum(0).double()


def score(model, spec, windows, batch_size: int = 4, **_) -> Scores:
    if not spec.causal_lm:
        raise PruneflowError("method taylor uses the next-token loss and needs a causal LM")
    geo = A.geometry(model.config)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    try:
        with torch.enable_grad():
            for start in range(0, len(windows), batch_size):
                batch = windows[start:start + batch_size].to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss * len(batch) / len(windows)
                loss.backward()
        heads, channels = [], []
        for block in A.blocks(model, spec):
            q_rows = _row_saliency(A.get(block, spec.q)).reshape(-1, geo.head_dim).sum(1)  # (H,)
            o_cols = _column_saliency(A.get(block, spec.o)).reshape(-1, geo.head_dim).sum(1)  # (H,)
            kv = (_row_saliency(A.get(block, spec.k)) + _row_saliency(A.get(block, spec.v)))
            kv = kv.reshape(-1, geo.head_dim).sum(1)  # (KV,)
            group = len(q_rows) // len(kv)
            heads.append((q_rows + o_cols + kv.repeat_interleave(group) / group).float())
            channel = _row_saliency(A.get(block, spec.up)) + _column_saliency(A.get(block, spec.down))
            if spec.gate:
                channel = channel + _row_saliency(A.get(block, spec.gate))
            channels.append(channel.float())
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return Scores(heads=heads, channels=channels, comparable=True)
