"""The experts unit: whole experts of Mixture-of-Experts blocks (transformers 5's fused expert tensors).

An expert of block l is its slice ``e`` of ``experts.gate_up_proj`` (E, 2I, D) and ``experts.down_proj``
(E, D, I) and its row of the router's weight (E, D). Removing it removes all three; the router then chooses its
top-k among the experts left, exactly as the dense model would with the removed experts' logits at −inf (the
softmax over the kept logits is the softmax over all of them with those set to −inf). A block never keeps fewer
experts than its top-k (``num_experts_per_tok``). Equal counts in every block give a stock config
(``num_experts`` changes); different counts are saved with the per-layer loader (``pruneflow_layers``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pruneflow.model import arch as A
from pruneflow.execution import streaming
from pruneflow.model.arch import ArchSpec
from pruneflow.errors import PruneflowError
from pruneflow.model.modeling_pruneflow import resize_experts
from pruneflow.selection.plan import LayerPlan, accounting, PrunePlan, SelectConfig
from pruneflow.selection.scores import Scores, zscore
from pruneflow.methods import METHODS


def check_units(spec: ArchSpec, units: list[str] | tuple[str, ...], method: str | None = None) -> None:
    """The unit types (and ``method``) fit the architecture: experts only on MoE models; MoE models (for now)
    by whole experts or by the channels inside their experts, with a method that scores those."""
    if "experts" in units and not spec.moe:
        raise PruneflowError("prune.units: experts needs a Mixture-of-Experts model (qwen3_moe, mixtral); this "
                             "model's MLPs are dense: prune heads, channels or layers")
    if not spec.moe or list(units) in (["experts"], ["hidden"]):
        return
    if list(units) != ["channels"]:
        raise PruneflowError(f"prune.units: this Mixture-of-Experts model is pruned by whole experts (units: "
                             f"[experts], methods router_weighted or expert_drop), by the channels inside its "
                             f"experts (units: [channels]) or by hidden channels (units: [hidden], minitron), "
                             f"not {', '.join(units)}")
    if method is not None and not METHODS[method].expert_channels:
        able = ", ".join(name for name, m in METHODS.items() if m.expert_channels)
        raise PruneflowError(f"method {method} does not score the channels inside experts; on this "
                             f"Mixture-of-Experts model use one of {able} (or units: [experts])")


def check(model: nn.Module, spec: ArchSpec) -> None:
    """Refuse a model whose experts this module cannot remove."""
    check_units(spec, ("experts",))
    layers = A.blocks(model, spec)
    dense = [i for i, block in enumerate(layers) if not _has(block, spec.experts)]
    if dense:
        raise PruneflowError(f"prune.units: blocks {dense} of this model have a dense MLP (mlp_only_layers / "
                             f"decoder_sparse_step); pruning its experts (whole, or their channels) needs every "
                             f"block sparse")
    if streaming.is_streamed(model):
        raise PruneflowError("prune.units: the experts of an MoE model (whole, or their channels) are pruned in "
                             "memory; this model is streamed (above runtime.max_memory): raise the budget")


def _has(block: nn.Module, path: str) -> bool:
    try:
        block.get_submodule(path)
    except AttributeError:
        return False
    return True


def parts(block: nn.Module, spec: ArchSpec) -> tuple[nn.Module, nn.Module]:
    """(router, experts) of one MoE block."""
    return A.get(block, spec.router), A.get(block, spec.experts)


def expert_cost(block: nn.Module, spec: ArchSpec) -> int:
    """Parameters one expert owns in ``block``: its expert slices, its router row (and router bias entry)."""
    router, experts = parts(block, spec)
    bias = getattr(router, "bias", None)
    return (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel() + router.weight.shape[1]
            + (bias is not None))


def _counts(model: nn.Module, spec: ArchSpec) -> list[tuple[int, int, int]]:
    """Per block: (experts, top-k, parameters per expert)."""
    out = []
    for block in A.blocks(model, spec):
        router, experts = parts(block, spec)
        out.append((experts.num_experts, router.top_k, expert_cost(block, spec)))
    return out


def removal_count(model: nn.Module, spec: ArchSpec, ratio: float) -> int:
    """Experts to remove from every block so that ``ratio`` of the non-embedding parameters go (uniform), or a
    clear error when that count removes none, or leaves a block fewer experts than its top-k."""
    counts, non_embedding = _counts(model, spec), A.count_parameters(model)["non_embedding"]
    per_step = sum(cost for _, _, cost in counts)  # one expert from every block
    removed = round(ratio * non_embedding / per_step)
    share = per_step / non_embedding
    if removed < 1:
        raise PruneflowError(f"prune.ratio={ratio} removes less than one expert per layer (one expert from every "
                             f"layer is {share:.1%} of the non-embedding parameters): use a ratio of at least "
                             f"{share / 2:.1%}")
    for layer, (experts, top_k, _) in enumerate(counts):
        if removed >= experts:
            raise PruneflowError(f"prune.ratio={ratio} would remove every expert of layer {layer} "
                                 f"({experts} experts, {share:.1%} of the parameters each step): lower the ratio")
        if experts - removed < top_k:
            most = (experts - top_k) * share
            raise PruneflowError(f"prune.ratio={ratio} keeps {experts - removed} experts in layer {layer}, fewer "
                                 f"than its top-k (num_experts_per_tok={top_k}): use a ratio of at most "
                                 f"{most:.1%}")
    return removed


def check_ratio(model: nn.Module, spec: ArchSpec, cfg: SelectConfig) -> None:
    """The plan ``cfg`` asks for exists (before any forward pass): uniform, a count every block can give; global,
    a target the blocks' experts above their top-k can meet."""
    check(model, spec)
    if cfg.allocation == "uniform":
        removal_count(model, spec, cfg.ratio)
        return
    counts, non_embedding = _counts(model, spec), A.count_parameters(model)["non_embedding"]
    most = sum((experts - top_k) * cost for experts, top_k, cost in counts) / non_embedding
    least = min(cost for _, _, cost in counts) / non_embedding
    if cfg.ratio > most + least / 2:
        raise PruneflowError(f"prune.ratio={cfg.ratio}: every layer keeps at least its top-k experts, which allows "
                             f"removing at most {most:.1%} of the non-embedding parameters: lower the ratio")
    if cfg.ratio < least / 2:
        raise PruneflowError(f"prune.ratio={cfg.ratio} removes less than one expert ({least:.1%} of the "
                             f"non-embedding parameters): raise the ratio")


def select(model: nn.Module, spec: ArchSpec, scores: Scores, cfg: SelectConfig, method: str = "",
           seed: int = 0) -> PrunePlan:
    """Remove the lowest-scoring experts: the same number from every block (uniform), or ranked across blocks
    (global; scores standardized per block unless comparable), never below a block's top-k."""
    check_ratio(model, spec, cfg)
    if scores.experts is None:
        raise PruneflowError(f"prune.units: method {method} gives no expert scores (use router_weighted or "
                             f"expert_drop)")
    counts, params = _counts(model, spec), A.count_parameters(model)
    if cfg.allocation == "uniform":
        n = removal_count(model, spec, cfg.ratio)
        removed = {layer: _weakest(s, n) for layer, s in enumerate(scores.experts)}
    elif cfg.allocation == "global":
        ranked = scores.experts if scores.comparable else [zscore(s.double()) for s in scores.experts]
        units = sorted((float(v), layer, e) for layer, s in enumerate(ranked) for e, v in enumerate(s.tolist()))
        target, total, removed = cfg.ratio * params["non_embedding"], 0, {layer: [] for layer in range(len(counts))}
        slack = min(cost for _, _, cost in counts) / 2
        for _, layer, e in units:
            experts, top_k, cost = counts[layer]
            if total >= target - slack:
                break
            if len(removed[layer]) < experts - top_k and total + cost <= target + slack:
                removed[layer].append(e)
                total += cost
    else:
        raise PruneflowError(f"prune.allocation: {cfg.allocation} is not a selection rule for experts "
                             f"(uniform or global)")
    kept = [[e for e in range(experts) if e not in set(removed[layer])] for layer, (experts, _, _) in enumerate(counts)]
    widths = A.layer_widths(model, spec)
    plan = PrunePlan(method=method, ratio=cfg.ratio, allocation=cfg.allocation, head_mode=cfg.head_mode,
                     units=["experts"], round_to=cfg.round_to, reconstruct="none", seed=seed,
                     layers=[LayerPlan.full(w["heads"], w["kv_heads"], w["channels"]) for w in widths],
                     kept={NAME: kept})
    gone = sum((experts - len(k)) * cost for k, (experts, _, cost) in zip(kept, counts))
    plan.params = accounting(params, gone) | {
        "experts_before": [experts for experts, _, _ in counts], "experts_after": [len(k) for k in kept]}
    return plan


def _weakest(scores: torch.Tensor, n: int) -> list[int]:
    return sorted(int(i) for i in torch.argsort(scores.double(), stable=True)[:n])


@torch.no_grad()
def apply(model: nn.Module, spec: ArchSpec, kept: list[list[int]]) -> None:
    """Keep only the experts ``kept[l]`` of every block (their expert slices and router rows); with equal counts,
    the config's expert count follows."""
    check(model, spec)
    layers = A.blocks(model, spec)
    if len(kept) != len(layers):
        raise PruneflowError(f"plan has expert lists for {len(kept)} layers, the model has {len(layers)}")
    for layer, (block, chosen) in enumerate(zip(layers, kept)):
        router, experts = parts(block, spec)
        if not chosen:
            raise PruneflowError(f"plan removes every expert of layer {layer}")
        if len(set(chosen)) != len(chosen) or min(chosen) < 0 or max(chosen) >= experts.num_experts:
            raise PruneflowError(f"plan layer {layer} keeps experts outside 0..{experts.num_experts - 1} or "
                                 f"repeats some")
        if len(chosen) < router.top_k:
            raise PruneflowError(f"plan keeps {len(chosen)} experts in layer {layer}, fewer than its top-k "
                                 f"(num_experts_per_tok={router.top_k})")
        index = torch.as_tensor(sorted(chosen), dtype=torch.long)
        resize_experts(router, experts, len(chosen), lambda old: old.index_select(0, index.to(old.device)).contiguous())
    if len({len(k) for k in kept}) == 1:
        for key in A.EXPERT_KEYS:
            if key in vars(model.config) or key in getattr(model.config, "attribute_map", {}):
                setattr(model.config, key, len(kept[0]))


# ---- what the expert scorers share: every expert's output, and the router's choice among kept experts ----

def expert_output(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s output for tokens ``x`` (T, D), computed as transformers' fused experts do."""
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[e])


def route(router: nn.Module, logits: torch.Tensor, dropped: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, indices), each (T, top_k), the router chooses from ``logits`` (T, E) with the ``dropped``
    experts' (bool (E,)) logits at −inf: softmax in float32, top-k, renormalised unless the router says not.
    ``dropped`` (C, E): C choices at once, each (C, T, top_k)."""
    if dropped is not None:
        dropped = dropped.to(logits.device)
        if dropped.dim() == 2:
            logits = logits.expand(dropped.shape[0], *logits.shape)
            dropped = dropped[:, None, :]
        logits = logits.masked_fill(dropped, -math.inf)
    probs = torch.softmax(logits.float(), dim=-1)
    weights, indices = torch.topk(probs, router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):  # Mixtral's router always renormalises (it has no flag)
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def router_logits(router: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, router.weight, getattr(router, "bias", None))


# the unit protocol (pruneflow.units)
NAME = "experts"


def claims(units, spec: ArchSpec) -> bool:
    return "experts" in units


def check_settings(spec: ArchSpec, cfg, method: str | None = None) -> None:
    """Experts on a dense model, or units an MoE model is not pruned by (``cfg`` resolved ``prune.*``)."""
    check_units(spec, cfg.units, method)


def check_model(model: nn.Module, spec: ArchSpec, cfg) -> None:
    check_ratio(model, spec, SelectConfig(ratio=cfg.ratio, allocation=cfg.allocation))


def holds(plan: PrunePlan) -> bool:
    return plan.kept_experts is not None


def apply_plan(model: nn.Module, spec: ArchSpec, plan: PrunePlan, scores=None) -> None:
    apply(model, spec, plan.kept_experts)
