"""Distances between hidden states at block boundaries, for the depth (layer-removal) methods.

Boundary l is the input of block l (boundary L: the output of the last block). For each calibration batch,
every boundary state is compared with the one ``span`` blocks later as soon as that one is computed, and
dropped: at most ``span`` states per batch are held, in the model's dtype; cosines are taken in the
accumulation dtype a few tokens at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pruneflow.model import arch as A
from pruneflow.model.arch import ArchSpec
from pruneflow.execution.runtime import Runtime
from pruneflow.execution.passes import calibration_pass

CHUNK_TOKENS = 256


def cosine(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(B, T, D) × 2 → (B·T,) cosine similarity per token in ``dtype``, clamped to [-1, 1]."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    parts = [torch.nn.functional.cosine_similarity(x.to(dtype), y.to(dtype), dim=-1)
             for x, y in zip(a.split(CHUNK_TOKENS), b.split(CHUNK_TOKENS))]
    return torch.cat(parts).clamp(-1, 1)


@torch.no_grad()
def boundary_distances(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, runtime: Runtime, span: int,
                       distance: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 8) -> torch.Tensor:
    """(L − span + 1,) float64: for each start l, the mean over calibration tokens of ``distance(cos(h_l,
    h_{l+span}))``.

    States are keyed by (batch, boundary): a block's n-th call sees batch n, whether the model runs batch by
    batch (``span`` states of one batch held) or, streamed, block by block (``span`` states of every batch)."""
    count = len(A.blocks(model, spec))
    totals = torch.zeros(count - span + 1, dtype=torch.float64)
    recent: dict[tuple[int, int], torch.Tensor] = {}  # (batch, boundary) → its state, until its partner is computed
    calls = [0] * count

    def capture(index: int) -> Callable:
        def hook(_module, args, kwargs, output):
            batch = calls[index]
            calls[index] += 1
            if index == 0:
                recent[batch, 0] = (args[0] if args else kwargs["hidden_states"]).detach()
            state = (output[0] if isinstance(output, tuple) else output).detach()
            start = index + 1 - span
            if start >= 0:
                first = recent.pop((batch, start))
                totals[start] += distance(cosine(first, state.to(first.device), runtime.accum_dtype)).sum().item()
            if index + 1 <= count - span:  # a later boundary compares with it
                recent[batch, index + 1] = state
        return hook

    try:
        calibration_pass(model, spec, windows, runtime,
                         lambda i, block: [block.register_forward_hook(capture(i), with_kwargs=True)],
                         state=(totals,), batch_size=batch_size, desc="boundary states")
    finally:
        recent.clear()
    return totals / windows.numel()
