"""LLM-Pruner-style first-order Taylor importance: Σ |W ⊙ ∂L/∂W| over each unit's weights (needs gradients).

Head h: its q_proj rows and o_proj columns; a whole KV group adds its KV head's k/v rows (``Scores.kv_heads``),
counted only when the group goes — removing query heads keeps their KV head. MLP channel j: its gate/up rows and
down_proj column. The loss is the mean next-token loss over the calibration windows.
Unlike the forward-only methods this holds a gradient for every scored projection (embeddings, norms and the
LM head get none) plus the activations of a backward pass; the loss over the vocabulary is chunked. Each batch's
gradient is added into a float32 sum as soon as it is complete (a bf16 ``.grad`` summed over batches would round
every addition to 8 bits of mantissa), so a bf16 model holds its scored projections' gradients in float32.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pruneflow.model import arch as A
from pruneflow.errors import PruneflowError
from pruneflow.execution.losses import training_losses
from pruneflow.selection.scores import Scores

ROWS = 1024  # rows of W ⊙ G formed in the accumulation dtype at a time


def _products(linear: torch.nn.Linear, grads: dict, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """|W ⊙ g| in ``dtype``, a block of rows at a time (``grads``: each parameter's summed gradient)."""
    for w, g in zip(linear.weight.detach().split(ROWS), grads[linear.weight].split(ROWS)):
        yield (w.to(dtype) * g.to(dtype)).abs()


def _row_saliency(linear: torch.nn.Linear, grads: dict, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(out,) Σ_in |W ⊙ g| per output row (bias included)."""
    saliency = torch.cat([block.sum(1) for block in _products(linear, grads, dtype)])
    if linear.bias is not None:
        saliency = saliency + (linear.bias.detach().to(dtype) * grads[linear.bias].to(dtype)).abs()
    return saliency


def _column_saliency(linear: torch.nn.Linear, grads: dict, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(in,) Σ_out |W ⊙ g| per input column."""
    return sum(block.sum(0) for block in _products(linear, grads, dtype))


def _summed_in_float32(params: list[torch.nn.Parameter]) -> tuple[dict, list]:
    """A float32 sum of each parameter's gradient over the backward passes, added as each one completes (its
    ``.grad`` is then dropped); returns (the sums by parameter, the hook handles)."""
    sums: dict = {}

    def add(p: torch.nn.Parameter) -> None:
        if p in sums:
            sums[p].add_(p.grad)
        else:
            sums[p] = p.grad.to(torch.float32, copy=True)
        p.grad = None

    return sums, [p.register_post_accumulate_grad_hook(add) for p in params]


def _projections(model, spec) -> list[torch.nn.Linear]:
    paths = [p for p in (spec.q, spec.k, spec.v, spec.o, spec.gate, spec.up, spec.down) if p]
    return [A.get(block, path) for block in A.blocks(model, spec) for path in paths]


def score(model, spec, windows, runtime, batch_size: int = 4, **_) -> Scores:
    if not spec.causal_lm:
        raise PruneflowError("method taylor uses the next-token loss and needs a causal LM")
    geo, dtype = A.geometry(model.config), runtime.accum_dtype
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    for layer in _projections(model, spec):
        layer.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    grads, handles = _summed_in_float32([p for p in model.parameters() if p.requires_grad])
    try:
        with torch.enable_grad():
            for batch in runtime.batches(model, windows, batch_size, desc="taylor backward"):
                ce, _ = training_losses(model, batch)
                (ce * len(batch) / len(windows)).backward()
        heads, kv_heads, channels = [], [], []
        for block in A.blocks(model, spec):
            q_rows = _row_saliency(A.get(block, spec.q), grads, dtype).reshape(-1, geo.head_dim).sum(1)  # (H,)
            o_cols = _column_saliency(A.get(block, spec.o), grads, dtype).reshape(-1, geo.head_dim).sum(1)  # (H,)
            kv = _row_saliency(A.get(block, spec.k), grads, dtype) + _row_saliency(A.get(block, spec.v), grads, dtype)
            kv_heads.append(kv.reshape(-1, geo.head_dim).sum(1).float().cpu())  # (KV,)
            heads.append((q_rows + o_cols).float().cpu())
            channel = (_row_saliency(A.get(block, spec.up), grads, dtype)
                       + _column_saliency(A.get(block, spec.down), grads, dtype))
            if spec.gate:
                channel = channel + _row_saliency(A.get(block, spec.gate), grads, dtype)
            channels.append(channel.float().cpu())
    finally:
        for handle in handles:
            handle.remove()
        grads.clear()
        model.zero_grad(set_to_none=True)
        for p, flag in flags:
            p.requires_grad_(flag)
    return Scores(heads=heads, channels=channels, comparable=True, kv_heads=kv_heads)
