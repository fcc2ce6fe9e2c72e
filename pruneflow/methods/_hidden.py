"""Hidden states at block boundaries, for the depth (layer-removal) methods."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from pruneflow import arch as A
from pruneflow.arch import ArchSpec


@torch.no_grad()
def boundary_states(model: nn.Module, spec: ArchSpec, windows: torch.Tensor,
                    batch_size: int = 8) -> Iterator[list[torch.Tensor]]:
    """Per calibration batch: [h_0, …, h_L], the input of every block and the output of the last, (B, T, D)."""
    blocks = A.blocks(model, spec)
    states: list[torch.Tensor] = []

    def capture(index: int) -> Callable:
        def hook(_module, args, kwargs, output):
            if index == 0:
                states.append((args[0] if args else kwargs["hidden_states"]).double())
            states.append((output[0] if isinstance(output, tuple) else output).double())
        return hook

    handles = [block.register_forward_hook(capture(i), with_kwargs=True) for i, block in enumerate(blocks)]
    device = next(model.parameters()).device
    try:
        for start in range(0, len(windows), batch_size):
            states.clear()
            model(input_ids=windows[start:start + batch_size].to(device))
            yield list(states)
    finally:
        for handle in handles:
            handle.remove()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, T, D) × 2 → (B·T,) cosine similarity per token, clamped to [-1, 1]."""
    return torch.nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]),
                                                 dim=-1).clamp(-1, 1)
