"""Scores from the inputs a block's linear layers see: the calibration statistics most scorers share (the input
moments of o_proj and down_proj, :class:`~pruneflow.execution.stats.InputStats`), collected through the execution layer's
calibration pass (sums over tokens: fanned out over ``--workers`` when there are any)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pruneflow.model import arch as A
from pruneflow.model import mlp as M
from pruneflow.model.arch import ArchSpec
from pruneflow.execution.passes import calibration_pass
from pruneflow.execution.runtime import Runtime
from pruneflow.selection.scores import Scores, zscore
from pruneflow.execution.stats import InputStats


def stats_hooks(spec: ArchSpec, runtime: Runtime, attn_stats: list, mlp_stats: list) -> Callable:
    """``calibration_pass`` hooks that collect the input moments of block i's o_proj and down_proj into
    ``attn_stats[i]`` / ``mlp_stats[i]`` (an MoE block: a list, one per expert's down_proj, over the tokens
    routed to it)."""
    def recorder(stats: InputStats):
        def hook(_module, args):
            stats.add(args[0].detach().reshape(-1, args[0].shape[-1]), runtime.accum_dtype)  # (tokens, in)
        return hook

    def hooks(i: int, block: nn.Module) -> list:
        attn_stats.append(InputStats())
        return [A.get(block, spec.o).register_forward_pre_hook(recorder(attn_stats[i])),
                M.of(spec).record(block, spec, runtime.accum_dtype, mlp_stats)]
    return hooks


def column_sums(weight: torch.Tensor, dtype: torch.dtype, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(in,) Σ over rows of ``fn(W)`` for an (out, in) weight, in ``dtype``, a block of rows at a time (no full
    high-precision copy of the weight)."""
    total = torch.zeros(weight.shape[1], dtype=dtype, device=weight.device)
    for rows in weight.detach().split(1024):
        total += fn(rows.to(dtype)).sum(0)
    return total


def per_head(channel_scores: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(H·d,) per o_proj input channel → (H,) per head, the mean over the head's dimensions."""
    return channel_scores.reshape(-1, head_dim).mean(1)


def from_input_channels(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, runtime: Runtime,
                        importance: Callable[[torch.Tensor, InputStats], torch.Tensor],
                        with_means: bool = False, standardize: bool = False,
                        attn_importance: Callable[[torch.Tensor, InputStats], torch.Tensor] | None = None) -> Scores:
    """Scores from a per-input-channel importance of o_proj (averaged per head) and down_proj.

    ``importance(weight (out, in), stats of the layer's input)`` returns an (in,) tensor, computed as soon as
    the block has seen every calibration window (for a streamed model, while its weights are loaded);
    ``attn_importance``, if given, is o_proj's instead. With
    ``standardize``, each layer's o_proj and down_proj channel scores are z-scored before heads are
    averaged (FLAP's AL-AM), which makes them comparable across layers and modules. An MoE block's channel
    scores are (E, I), ``importance`` applied to every expert's down_proj (``pruneflow.units.expert_channels``).
    """
    head_dim = A.geometry(model.config).head_dim
    norm = zscore if standardize else (lambda x: x)
    attn_importance = attn_importance or importance
    attn_stats, mlp_stats, heads, channels = [], [], [], []

    def done(i: int, block: nn.Module) -> None:
        heads.append(per_head(norm(attn_importance(A.get(block, spec.o).weight, attn_stats[i])), head_dim)
                     .float().cpu())
        channel = M.of(spec).importance(block, spec, mlp_stats[i], importance)
        channels.append(norm(channel).float().cpu())

    calibration_pass(model, spec, windows, runtime, stats_hooks(spec, runtime, attn_stats, mlp_stats), done,
                     state=(attn_stats, mlp_stats))
    scores = Scores(heads=heads, channels=channels, comparable=standardize)
    if with_means:
        scores.attn_mean = [s.mean.float().cpu() for s in attn_stats]
        if M.of(spec).compensates:  # experts take no compensation bias
            scores.mlp_mean = [s.mean.float().cpu() for s in mlp_stats]
    return scores
