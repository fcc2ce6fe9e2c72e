"""What a scorer returns, and the calibration statistics most scorers share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from pruneflow import arch as A
from pruneflow.arch import ArchSpec


@dataclass
class Scores:
    """Per-unit importance, higher = keep.

    ``heads[l]``: (H_l,) per query head; ``channels[l]``: (I_l,) per MLP channel; ``layers``: (L,) per block
    (depth methods fill only this). ``comparable`` says the
    values share one scale across layers and module types (e.g. loss deltas); otherwise global allocation
    standardizes them per layer and module first. ``attn_mean``/``mlp_mean`` (per input channel of o/down)
    enable bias compensation.
    """

    heads: list[torch.Tensor]
    channels: list[torch.Tensor]
    comparable: bool = False
    layers: torch.Tensor | None = None  # (L,) per whole block, for depth pruning
    attn_mean: list[torch.Tensor] | None = None
    mlp_mean: list[torch.Tensor] | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class InputStats:
    """Running first and second moments of one Linear layer's input channels over calibration tokens."""

    total: torch.Tensor
    total_sq: torch.Tensor
    count: int = 0

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def l2(self) -> torch.Tensor:  # ‖X_j‖₂ over all tokens
        return self.total_sq.sqrt()

    @property
    def var(self) -> torch.Tensor:  # unbiased variance over tokens
        return (self.total_sq - self.total ** 2 / self.count) / max(1, self.count - 1)


@torch.no_grad()
def collect_input_stats(model: nn.Module, spec: ArchSpec, windows: torch.Tensor,
                        batch_size: int = 8) -> tuple[list[InputStats], list[InputStats]]:
    """One forward pass over the calibration windows; input moments of every o_proj and down_proj."""
    attn_stats, mlp_stats, handles = [], [], []

    def recorder(stats: InputStats):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (tokens, in_features)
            stats.total += x.sum(0)
            stats.total_sq += (x * x).sum(0)
            stats.count += x.shape[0]
        return hook

    for block in A.blocks(model, spec):
        for path, bucket in ((spec.o, attn_stats), (spec.down, mlp_stats)):
            layer = A.get(block, path)
            stats = InputStats(torch.zeros(layer.in_features, dtype=torch.float64),
                               torch.zeros(layer.in_features, dtype=torch.float64))
            bucket.append(stats)
            handles.append(layer.register_forward_pre_hook(recorder(stats)))
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="calibration forward", unit="batch",
                          leave=False):
            model(input_ids=windows[start:start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return attn_stats, mlp_stats


def per_head(channel_scores: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(H·d,) per o_proj input channel → (H,) per head, the mean over the head's dimensions."""
    return channel_scores.reshape(-1, head_dim).mean(1)


def zscore(values: torch.Tensor) -> torch.Tensor:
    """(n,) → standardized (mean 0, std 1); all zeros when there is no spread to standardize."""
    std = values.std() if values.numel() > 1 else values.new_zeros(())
    return (values - values.mean()) / std if std > 0 else torch.zeros_like(values)


def from_input_channels(model: nn.Module, spec: ArchSpec, windows: torch.Tensor,
                        importance: Callable[[torch.Tensor, InputStats], torch.Tensor],
                        with_means: bool = False, standardize: bool = False) -> Scores:
    """Scores from a per-input-channel importance of o_proj (averaged per head) and down_proj.

    ``importance(weight (out, in), stats of the layer's input)`` returns an (in,) tensor. With
    ``standardize``, each layer's o_proj and down_proj channel scores are z-scored before heads are
    averaged (FLAP's AL-AM), which makes them comparable across layers and modules.
    """
    head_dim = A.geometry(model.config).head_dim
    attn_stats, mlp_stats = collect_input_stats(model, spec, windows)
    norm = zscore if standardize else (lambda x: x)
    heads, channels = [], []
    for block, attn, mlp in zip(A.blocks(model, spec), attn_stats, mlp_stats):
        heads.append(per_head(norm(importance(A.get(block, spec.o).weight, attn)), head_dim).float())
        channels.append(norm(importance(A.get(block, spec.down).weight, mlp)).float())
    scores = Scores(heads=heads, channels=channels, comparable=standardize)
    if with_means:
        scores.attn_mean = [s.mean.float() for s in attn_stats]
        scores.mlp_mean = [s.mean.float() for s in mlp_stats]
    return scores
