"""Virtual sub-models: per-batch-row masks on attention heads and MLP channels, no weight copies.

A head's output enters o_proj as ``head_dim`` input channels and an MLP channel enters down_proj as one
input channel (``act(gate) · up``), so both masks act on those layers' inputs. Each batch row gets its own
mask, so one forward pass evaluates several sub-models (masks in the batch dimension).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from pruneflow.model import arch as A
from pruneflow.model.arch import ArchSpec


@contextmanager
def block_masks(block: nn.Module, spec: ArchSpec, head_dim: int, head_mask: torch.Tensor | None = None,
                channel_mask: torch.Tensor | None = None):
    """Within ``block``, row b of every batch is computed with ``head_mask[b]`` (H,) and ``channel_mask[b]``
    (I,) applied (1 keeps a unit, 0 removes it); masks are (B, H) / (B, I), B the batch size inside."""
    def hook(mask: torch.Tensor, repeat: int):
        expanded = mask.repeat_interleave(repeat, dim=1) if repeat > 1 else mask  # (B, in_features)

        def pre_hook(_module, args):
            x = args[0]  # (B, T, in_features)
            return (x * expanded[:, None, :].to(device=x.device, dtype=x.dtype),) + tuple(args[1:])
        return pre_hook

    handles = []
    try:
        if head_mask is not None:
            handles.append(A.get(block, spec.o).register_forward_pre_hook(hook(head_mask, head_dim)))
        if channel_mask is not None:
            handles.append(A.get(block, spec.down).register_forward_pre_hook(hook(channel_mask, 1)))
        yield block
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def unit_masks(model: nn.Module, spec: ArchSpec, head_masks: list[torch.Tensor] | None = None,
               channel_masks: list[torch.Tensor] | None = None):
    """:func:`block_masks` on every block: ``head_masks[l]`` (B, H_l) and ``channel_masks[l]`` (B, I_l) in
    layer l, B equal to the batch size of the forward passes made inside."""
    head_dim = A.geometry(model.config).head_dim
    with ExitStack() as stack:
        for layer, block in enumerate(A.blocks(model, spec)):
            stack.enter_context(block_masks(block, spec, head_dim,
                                            None if head_masks is None else head_masks[layer],
                                            None if channel_masks is None else channel_masks[layer]))
        yield model
