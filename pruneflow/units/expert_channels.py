"""MLP channels inside the experts of Mixture-of-Experts blocks: the channels unit on an MoE model.

Channel j of expert e is rows j and I + j of ``experts.gate_up_proj[e]`` (its gate and up rows) and column j of
``experts.down_proj[e]``. The width methods score it as they score a dense MLP channel, from the expert's own
weights and from the statistics of its down_proj input over the calibration tokens the dense model routes to it
(what that down_proj sees; an expert no token reaches scores zero), giving (E, I) scores per block. Every
expert of a block keeps the same number of channels — the fused tensors stay rectangular — but its own best
ones. ``uniform``: the same width in every block (a stock config: ``moe_intermediate_size`` or Mixtral's
``intermediate_size``). ``global``: a block gives up channels one *slot* at a time (the next-weakest channel of
every one of its experts), slots scored by the mean over the experts of their standardized scores and ranked
across blocks, so widths differ per block (the per-layer loader).

Widths move in steps of ``arch.GROUPED_MM_ALIGN`` (8) channels and of ``prune.round_to`` (their least common
multiple): transformers runs fused experts with ``grouped_mm``, which needs every weight stride a multiple of 16
bytes — an expert width of 21 fails there at the first forward pass.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pruneflow.model import arch as A
from pruneflow.units import experts as X
from pruneflow.model.arch import ArchSpec
from pruneflow.errors import PruneflowError
from pruneflow.model.modeling_pruneflow import resize_expert_width
from pruneflow.selection.plan import LayerPlan, accounting, PrunePlan, SelectConfig
from pruneflow.selection.scores import Scores, zscore

ALLOCATIONS = ("uniform", "global")


def check(model: nn.Module, spec: ArchSpec, cfg: SelectConfig | None = None) -> None:
    """Refuse a model or settings this module cannot prune expert channels with (before any forward pass)."""
    X.check(model, spec)  # every block sparse, in memory
    if cfg is None:
        return
    check_settings_of(cfg)
    removal_counts(model, spec, cfg)


def check_settings_of(cfg) -> None:
    """``cfg``'s (resolved ``prune.*``) allocation and reconstruction are ones expert channels take."""
    if cfg.allocation not in ALLOCATIONS:
        raise PruneflowError(f"prune.allocation: {cfg.allocation}: the channels of experts are removed uniformly "
                             f"or globally (one slot of every expert of a block at a time): set prune.allocation: "
                             f"uniform or global")
    if cfg.reconstruct != "none":
        raise PruneflowError(f"prune.reconstruct: {cfg.reconstruct} re-fits a dense down_proj; an expert's output "
                             f"is scaled by its routing weight and carries no bias: set prune.reconstruct: none")


def slot_cost(block: nn.Module, spec: ArchSpec) -> int:
    """Parameters one slot (one channel of every expert of ``block``) owns: gate and up rows, a down column."""
    experts = A.get(block, spec.experts)
    return experts.num_experts * (2 * experts.gate_up_proj.shape[2] + experts.down_proj.shape[1])


def step(round_to: int) -> int:
    """The channels an expert's width moves by: grouped_mm's alignment and ``round_to`` both divide it."""
    return math.lcm(A.GROUPED_MM_ALIGN, max(1, round_to))


def _widths(model: nn.Module, spec: ArchSpec, round_to: int = 1) -> list[tuple[int, int]]:
    """Per block: (an expert's channels, parameters per slot), checked to allow one step of ``round_to``."""
    out = []
    for layer, block in enumerate(A.blocks(model, spec)):
        width = A.get(block, spec.experts).down_proj.shape[2]
        if step(round_to) >= width:
            raise PruneflowError(f"prune.round_to={round_to}: expert widths move in steps of {step(round_to)} "
                                 f"channels (grouped_mm's 16-byte alignment, and round_to), which is not smaller "
                                 f"than layer {layer}'s expert width ({width})")
        out.append((width, slot_cost(block, spec)))
    return out


def removal_counts(model: nn.Module, spec: ArchSpec, cfg: SelectConfig) -> list[int] | None:
    """Uniform: the channels every expert of every block gives up (the same number everywhere, the kept width a
    multiple of ``round_to``); global: None after checking the target can be met. A clear error when no channel,
    or every channel of an expert, would go."""
    widths, non_embedding = _widths(model, spec, cfg.round_to), A.count_parameters(model)["non_embedding"]
    g = step(cfg.round_to)
    if cfg.allocation == "global":
        most = sum((width - g) * cost for width, cost in widths) / non_embedding
        least = g * min(cost for _, cost in widths) / non_embedding
        if cfg.ratio > most:
            raise PruneflowError(f"prune.ratio={cfg.ratio}: the experts' channels are at most {most:.1%} of the "
                                 f"non-embedding parameters (every expert keeps {g}): lower the ratio")
        if cfg.ratio < least / 2:
            raise PruneflowError(f"prune.ratio={cfg.ratio} removes less than {g} channels (one step) from every "
                                 f"expert of a layer ({least:.1%} of the non-embedding parameters): raise the ratio")
        return None
    per_step = sum(cost for _, cost in widths)  # one channel from every expert of every block
    share = per_step / non_embedding
    removed = round(cfg.ratio * non_embedding / per_step)
    counts = []
    for layer, (width, _) in enumerate(widths):
        kept = round((width - removed) / g) * g
        if kept >= width:
            raise PruneflowError(f"prune.ratio={cfg.ratio} removes no channel from the experts of layer {layer} "
                                 f"(one channel of every expert in every layer is {share:.1%} of the "
                                 f"non-embedding parameters; widths move in steps of {g}): raise the ratio")
        if kept < 1:
            raise PruneflowError(f"prune.ratio={cfg.ratio} would remove every channel of the experts of layer "
                                 f"{layer} ({width} channels, {share:.1%} of the parameters each): lower the ratio")
        counts.append(width - kept)
    return counts


def select(model: nn.Module, spec: ArchSpec, scores: Scores, cfg: SelectConfig, method: str = "",
           seed: int = 0) -> PrunePlan:
    """Every expert keeps its highest-scoring channels, as many as the other experts of its block."""
    X.check(model, spec)
    check_settings_of(cfg)
    if not scores.channels or scores.channels[0].dim() != 2:
        raise PruneflowError(f"method {method} gives no per-expert channel scores (use magnitude, random, "
                             f"wanda_sp or flap)")
    counts, g = removal_counts(model, spec, cfg), step(cfg.round_to)  # checks the ratio
    widths, params = _widths(model, spec, cfg.round_to), A.count_parameters(model)
    if counts is None:  # global: steps of g slots ranked across blocks
        ranked = [s.double() if scores.comparable else zscore(s.double()) for s in scores.channels]
        slots = [torch.sort(s, dim=1).values.mean(0) for s in ranked]  # (I,) ascending: the k-th weakest slot
        # a block's steps: its weakest slots down to the next multiple of g below its width, then g at a time,
        # while a multiple of g stays; each scored by the mean of its slots (ascending, as the slots are)
        units = []
        for layer, s in enumerate(slots):
            bounds = [0, *range(widths[layer][0] - (widths[layer][0] - 1) // g * g, widths[layer][0] - g + 1, g)]
            units += [(float(s[a:b].mean()), layer, b - a) for a, b in zip(bounds, bounds[1:])]
        counts, total, target = [0] * len(widths), 0, cfg.ratio * params["non_embedding"]
        slack = g * min(cost for _, cost in widths) / 2
        for _, layer, size in sorted(units):  # ascending per block, so each block gives up a prefix of its steps
            cost = widths[layer][1]
            if total >= target - slack:
                break
            if total + size * cost <= target + slack:
                counts[layer] += size
                total += size * cost
    kept = [[_strongest(row, width - n) for row in s] for s, (width, _), n in zip(scores.channels, widths, counts)]
    layer_widths = A.layer_widths(model, spec)
    plan = PrunePlan(method=method, ratio=cfg.ratio, allocation=cfg.allocation, head_mode=cfg.head_mode,
                     units=["channels"], round_to=cfg.round_to, reconstruct="none", seed=seed,
                     layers=[LayerPlan.full(w["heads"], w["kv_heads"], w["channels"] - n)
                             for w, n in zip(layer_widths, counts)],
                     kept={"expert_channels": kept})
    gone = sum(n * cost for n, (_, cost) in zip(counts, widths))
    plan.params = accounting(params, gone) | {
        "expert_width_before": [w for w, _ in widths],
        "expert_width_after": [w - n for (w, _), n in zip(widths, counts)]}
    return plan


def _strongest(scores: torch.Tensor, n: int) -> list[int]:
    """The ``n`` highest-scoring channels, in their order (ties: the lower index stays)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)[:n]
    return sorted(int(i) for i in order)


@torch.no_grad()
def apply(model: nn.Module, spec: ArchSpec, kept: list[list[list[int]]]) -> None:
    """Keep only channels ``kept[l][e]`` of expert e of block l (the same number for every expert of a block);
    with one width everywhere, the config's expert width follows."""
    X.check(model, spec)
    layers = A.blocks(model, spec)
    if len(kept) != len(layers):
        raise PruneflowError(f"plan has expert channel lists for {len(kept)} layers, the model has {len(layers)}")
    for layer, (block, chosen) in enumerate(zip(layers, kept)):
        experts = A.get(block, spec.experts)
        width = experts.down_proj.shape[2]
        if len(chosen) != experts.num_experts or len({len(c) for c in chosen}) != 1 or not chosen[0]:
            raise PruneflowError(f"plan layer {layer}: every one of its {experts.num_experts} experts must keep "
                                 f"the same, non-zero number of channels")
        if any(len(set(c)) != len(c) or min(c) < 0 or max(c) >= width for c in chosen):
            raise PruneflowError(f"plan layer {layer} keeps expert channels outside 0..{width - 1} or repeats some")
        index = torch.as_tensor([sorted(c) for c in chosen], dtype=torch.long, device=experts.down_proj.device)
        gate_up = torch.cat([index, index + width], dim=1)  # (E, 2I'): the gate rows, then the up rows
        resize_expert_width(experts, index.shape[1],
                            lambda old: old.gather(1, gate_up[:, :, None].expand(-1, -1, old.shape[2])).contiguous(),
                            lambda old: old.gather(2, index[:, None, :].expand(-1, old.shape[1], -1)).contiguous())
    widths = {len(chosen[0]) for chosen in kept}
    if len(widths) == 1:
        setattr(model.config, A.expert_width_key(vars(model.config)), widths.pop())


# the unit protocol (pruneflow.units)
NAME = "expert_channels"


def claims(units, spec: ArchSpec) -> bool:
    return spec.moe and "channels" in units


def check_settings(spec: ArchSpec, cfg, method: str | None = None) -> None:
    if claims(cfg.units, spec):
        check_settings_of(cfg)


def check_model(model: nn.Module, spec: ArchSpec, cfg) -> None:
    check(model, spec, SelectConfig(ratio=cfg.ratio, allocation=cfg.allocation, round_to=cfg.round_to,
                                    reconstruct=cfg.reconstruct))


def holds(plan: PrunePlan) -> bool:
    return plan.kept_expert_channels is not None


def apply_plan(model: nn.Module, spec: ArchSpec, plan: PrunePlan, scores=None) -> None:
    apply(model, spec, plan.kept_expert_channels)
