"""What a scorer returns (:class:`Scores`), and the standardisation scores share."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pruneflow.execution.stats import InputStats

__all__ = ["InputStats", "Scores", "zscore"]


@dataclass
class Scores:
    """Per-unit importance, higher = keep.

    ``heads[l]``: (H_l,) per query head; ``channels[l]``: (I_l,) per MLP channel; ``layers``: (L,) per block
    (depth methods fill only this); ``kv_heads[l]``: (KV_l,) the importance a whole KV group has beyond its query
    heads (its k/v rows), added to group units only — removing query heads keeps their KV head. ``comparable`` says the
    values share one scale across layers and module types (e.g. loss deltas); otherwise global allocation
    standardizes them per layer and module first. ``attn_mean``/``mlp_mean`` (per input channel of o/down)
    enable bias compensation.
    """

    heads: list[torch.Tensor]
    channels: list[torch.Tensor]
    comparable: bool = False
    layers: torch.Tensor | None = None  # (L,) per whole block, for depth pruning
    kv_heads: list[torch.Tensor] | None = None  # (KV_l,) what removing a KV head adds (whole-group units only)
    attn_mean: list[torch.Tensor] | None = None
    mlp_mean: list[torch.Tensor] | None = None
    hidden: torch.Tensor | None = None  # (D,) per hidden channel, for the hidden unit (one for the whole model)
    experts: list[torch.Tensor] | None = None  # (E_l,) per expert of each MoE block, for the experts unit
    extra: dict = field(default_factory=dict)


def zscore(values: torch.Tensor) -> torch.Tensor:
    """(n,) → standardized (mean 0, std 1); all zeros when there is no spread to standardize."""
    std = values.std() if values.numel() > 1 else values.new_zeros(())
    return (values - values.mean()) / std if std > 0 else torch.zeros_like(values)
