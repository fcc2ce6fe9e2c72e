"""The hidden unit: channels of the residual stream (the embedding dimension), pruned the same everywhere.

A hidden channel is one column of the embedding, of every projection that reads the residual stream (q, k, v,
gate, up) and of the head; one row (and bias entry) of every projection that writes it (o, down); one entry
of every norm over it (each block's and the final one). Heads keep their head_dim; the config gets the new
``hidden_size`` and an explicit ``head_dim``, so the checkpoint stays vanilla. The kept width is a multiple of
the number of query heads (transformers' configs require ``hidden_size % num_attention_heads == 0``) and of
``prune.round_to``. RMSNorms then average over the kept channels only, as Minitron's pruning leaves them
(recovery with distillation is its recipe). In a Mixture-of-Experts block the router's weight columns and the
fused experts' hidden axis (``gate_up_proj`` (E, 2I, D) reads it, ``down_proj`` (E, D, I) writes it) are sliced
too, and the kept width is also a multiple of ``arch.GROUPED_MM_ALIGN`` (8): ``grouped_mm`` needs 16-byte
strides.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pruneflow.model import arch as A
from pruneflow.model import mlp
from pruneflow.execution import streaming
from pruneflow.model.arch import ArchSpec
from pruneflow.errors import PruneflowError
from pruneflow.selection.plan import LayerPlan, accounting, PrunePlan, SelectConfig
from pruneflow.selection.scores import Scores

READERS = ("q", "k", "v", "gate", "up")  # projections whose input is the residual stream
WRITERS = ("o", "down")  # projections whose output is added to it


def check_arch(spec: ArchSpec) -> None:
    if not spec.norms or spec.final_norm is None or not spec.causal_lm:
        raise PruneflowError("prune.units: hidden is supported for decoder LMs whose ArchSpec names their norms "
                             "(llama, mistral, qwen2, qwen3), not this architecture")


def check(model: nn.Module, spec: ArchSpec) -> None:
    """Refuse a model whose hidden dimension this module cannot slice consistently."""
    check_arch(spec)
    if getattr(model.config, "model_type", "").startswith(A.PRUNED_PREFIX):
        raise PruneflowError("prune.units: hidden needs a checkpoint with uniform widths; this one has per-layer "
                             "widths (prune the hidden dimension first, then heads and channels)")
    if streaming.is_streamed(model):
        raise PruneflowError("prune.units: hidden channels are sliced in memory; this model is streamed (above "
                             "runtime.max_memory): raise the budget")


def _tensors(model: nn.Module, spec: ArchSpec) -> list[tuple[nn.Module, str, int, bool]]:
    """Every (module, parameter name, hidden axis, counts as embedding) that holds the hidden dimension."""
    out = [(model.get_input_embeddings(), "weight", 1, True)]
    for block in A.blocks(model, spec):
        for name in READERS:
            path = getattr(spec, name)
            if path:
                out.append((A.get(block, path), "weight", 1, False))
        for name in WRITERS:
            if getattr(spec, name) is None:  # an MoE block's down: the fused experts
                continue
            module = A.get(block, getattr(spec, name))
            out.append((module, "weight", 0, False))
            if module.bias is not None:
                out.append((module, "bias", 0, False))
        out += [(module, name, dim, False) for module, name, dim in mlp.of(spec).stream_tensors(block, spec)]
        for path in spec.norms:
            norm = A.get(block, path)
            out += [(norm, p, 0, False) for p in ("weight", "bias") if getattr(norm, p, None) is not None]
    final = A.get(model, spec.final_norm)
    out += [(final, p, 0, False) for p in ("weight", "bias") if getattr(final, p, None) is not None]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        out.append((head, "weight", 1, True))
    return out


def _costs(model: nn.Module, spec: ArchSpec) -> tuple[int, int]:
    """(non-embedding, embedding) parameters one hidden channel owns (the same for every channel)."""
    hidden, costs = model.config.hidden_size, [0, 0]
    for module, name, _, embedding in _tensors(model, spec):
        costs[embedding] += getattr(module, name).numel() // hidden
    return costs[0], costs[1]


def select(model: nn.Module, spec: ArchSpec, scores: Scores, cfg: SelectConfig, method: str = "",
           seed: int = 0) -> PrunePlan:
    """Keep the highest-scoring hidden channels: as many as leave ``cfg.ratio`` of the non-embedding parameters
    removed, rounded to a multiple of the query heads and of ``cfg.round_to``; every block keeps its widths."""
    check(model, spec)
    if scores.hidden is None:
        raise PruneflowError(f"prune.units: method {method} gives no hidden-channel scores (use minitron)")
    hidden, heads = model.config.hidden_size, model.config.num_attention_heads
    params, (cost, embedding_cost) = A.count_parameters(model), _costs(model, spec)
    align = mlp.of(spec).align
    step = math.lcm(heads, cfg.round_to, align)
    want = hidden - cfg.ratio * params["non_embedding"] / cost
    kept = round(want / step) * step
    if kept < step or kept >= hidden:
        share = step * cost / params["non_embedding"]
        raise PruneflowError(f"prune.ratio={cfg.ratio}: the hidden size {hidden} is kept a multiple of {step} (query "
                             f"heads {heads}, round_to {cfg.round_to}{f', {align} for grouped_mm' if align > 1 else ''}), a step of {share:.1%} of the parameters; "
                             f"choose a ratio between {share:.1%} and {(hidden - step) * cost / params['non_embedding']:.1%}")
    order = torch.argsort(scores.hidden.float(), descending=True, stable=True)
    widths = A.layer_widths(model, spec)
    plan = PrunePlan(method=method, ratio=cfg.ratio, allocation=cfg.allocation, head_mode=cfg.head_mode,
                     units=["hidden"], round_to=cfg.round_to, reconstruct="none", seed=seed,
                     layers=[LayerPlan.full(w["heads"], w["kv_heads"], w["channels"]) for w in widths],
                     kept={NAME: sorted(int(i) for i in order[:kept])})
    gone = (hidden - kept) * cost
    plan.params = accounting(params, gone, (hidden - kept) * embedding_cost) | {"hidden_before": hidden,
                                                                               "hidden_after": kept}
    return plan


@torch.no_grad()
def apply(model: nn.Module, spec: ArchSpec, kept: list[int]) -> None:
    """Slice every tensor holding the hidden dimension to the channels ``kept`` (in place); update the config."""
    check(model, spec)
    hidden = model.config.hidden_size
    if not kept or len(set(kept)) != len(kept) or min(kept) < 0 or max(kept) >= hidden:
        raise PruneflowError(f"plan keeps hidden channels outside 0..{hidden - 1} or repeats some")
    if len(kept) % model.config.num_attention_heads:
        raise PruneflowError(f"plan keeps {len(kept)} hidden channels, not a multiple of the "
                             f"{model.config.num_attention_heads} query heads the config needs")
    head_dim = A.geometry(model.config).head_dim
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for module, name, axis, _ in _tensors(model, spec):
        old = getattr(module, name)
        index = torch.as_tensor(kept, dtype=torch.long, device=old.device)
        setattr(module, name, nn.Parameter(old.index_select(axis, index).contiguous(), requires_grad=old.requires_grad))
        if isinstance(module, nn.Linear):
            module.in_features, module.out_features = module.weight.shape[1], module.weight.shape[0]
        elif isinstance(module, nn.Embedding):
            module.embedding_dim = module.weight.shape[1]
        elif hasattr(module, "normalized_shape"):
            module.normalized_shape = (len(kept),)
        if hasattr(module, "hidden_dim"):  # an MoE router or fused experts module
            module.hidden_dim = len(kept)
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
        model.get_output_embeddings().in_features = len(kept)
    model.config.hidden_size = len(kept)
    model.config.head_dim = head_dim  # explicit: hidden_size // num_attention_heads no longer gives it


# the unit protocol (pruneflow.units)
NAME = "hidden"


def claims(units, spec: ArchSpec) -> bool:
    return "hidden" in units


def check_settings(spec: ArchSpec, cfg, method: str | None = None) -> None:
    """The architecture's refusal, before the model is loaded (the rest of :func:`check` needs the model)."""
    if claims(tuple(cfg.units), spec):
        check_arch(spec)


def check_model(model: nn.Module, spec: ArchSpec, cfg) -> None:
    check(model, spec)


def holds(plan: PrunePlan) -> bool:
    return plan.kept_hidden is not None


def apply_plan(model: nn.Module, spec: ArchSpec, plan: PrunePlan, scores=None) -> None:
    apply(model, spec, plan.kept_hidden)
