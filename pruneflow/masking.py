"""Virtual sub-models: per-batch-row masks on attention heads and MLP channels, no weight copies.

A head's output enters o_proj as ``head_dim`` input channels and an MLP channel enters down_proj as one
input channel (``act(gate) · up``), so both masks act on those layers' inputs. Each batch row gets its own
mask, so one forward pass evaluates several sub-models (masks in the batch dimension).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from pruneflow import arch as A
from pruneflow.arch import ArchSpec


@contextmanager
def unit_masks(model: nn.Module, spec: ArchSpec, head_masks: list[torch.Tensor] | None = None,
               channel_masks: list[torch.Tensor] | None = None):
    """Within the block, row b of every batch is computed with ``head_masks[l][b]`` (H_l,) and
    ``channel_masks[l][b]`` (I_l,) applied in layer l (1 keeps a unit, 0 removes it).

    Masks are (B, H_l) / (B, I_l) per layer, B equal to the batch size of the forward passes made inside.
    """
    head_dim = A.geometry(model.config).head_dim
    handles = []

    def hook(mask: torch.Tensor, repeat: int):
        expanded = mask.repeat_interleave(repeat, dim=1) if repeat > 1 else mask  # (B, in_features)

        def pre_hook(_module, args):
            x = args[0]  # (B, T, in_features)
            return (x * expanded[:, None, :].to(device=x.device, dtype=x.dtype),) + tuple(args[1:])
        return pre_hook

    try:
        for layer, block in enumerate(A.blocks(model, spec)):
            if head_masks is not None:
                handles.append(A.get(block, spec.o).register_forward_pre_hook(hook(head_masks[layer], head_dim)))
            if channel_masks is not None:
                handles.append(A.get(block, spec.down).register_forward_pre_hook(hook(channel_masks[layer], 1)))
        yield model
    finally:
        for handle in handles:
            handle.remove()
