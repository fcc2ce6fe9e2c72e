"""The sub-block unit: a block's whole attention or its whole MLP, removed on its own (BlockPruner).

A transformer block is two residual sub-blocks, ``h + attn(norm(h))`` and ``h + mlp(norm(h))``. Removing one
makes it a residual no-op: the block passes its input through that half. In the plan a removed attention is a
``LayerPlan`` keeping no heads and no KV heads, a removed MLP one keeping no channels, so the block slicer
(pruneflow.units.apply) removes them like any width and the per-layer loader (``pruneflow_layers``: ``heads: 0``,
``channels: 0``) rebuilds them: zero-width projections, and an attention that adds nothing (its KV cache entry is
empty, so positions stay right). The block's norms stay (``hidden`` parameters each, outside the removed cost).
In GGUF it is llama.cpp's ``deci`` with ``n_head = 0`` / ``n_ff = 0`` for the removed parts (pruneflow.model.export).

Scores (``Scores.extra["subblocks"]``, (L, 2): attention, MLP of every block) rank the sub-blocks, lowest
removed first; selection takes them in that order until the removed parameters are closest to the target.
"""

from __future__ import annotations

import torch
from torch import nn

from pruneflow.model import arch as A, mlp
from pruneflow.units.apply import layer_shapes
from pruneflow.model.arch import ArchSpec
from pruneflow.errors import PruneflowError
from pruneflow.selection.plan import LayerPlan, accounting, LayerShape, PrunePlan, SelectConfig, removed_parameters
from pruneflow.selection.scores import Scores
from pruneflow.units import alone

NAME = "subblocks"
KINDS = ("attention", "mlp")  # the two sub-blocks of a block, the columns of the scores


def claims(units, spec: ArchSpec) -> bool:
    return NAME in units


def check_settings(spec: ArchSpec, cfg, method: str | None = None) -> None:
    """Sub-blocks alone, on a dense decoder LM, globally ranked, without reconstruction (``cfg`` resolved)."""
    if not claims(cfg.units, spec):
        return
    alone(NAME, cfg.units)
    if not spec.causal_lm or mlp.of(spec) is not mlp.DENSE:
        raise PruneflowError("prune.units: subblocks removes the attention or the dense MLP of a decoder block "
                             "(llama, mistral, qwen2, qwen3); this architecture is "
                             f"{'an encoder' if not spec.causal_lm else 'a Mixture of Experts'}: prune heads and "
                             f"channels, or layers")
    if cfg.allocation != "global":
        raise PruneflowError(f"prune.allocation: {cfg.allocation}: sub-blocks are ranked across the whole model; "
                             f"set prune.allocation: global (or auto)")
    if cfg.reconstruct != "none":
        raise PruneflowError(f"prune.reconstruct: {cfg.reconstruct} re-fits the inputs of kept o_proj/down_proj "
                             f"columns; a removed sub-block keeps none: use reconstruct: none (or auto)")


def check_model(model: nn.Module, spec: ArchSpec, cfg) -> None:
    """A removed attention adds nothing; an o_proj bias (which a masked attention still adds) would be lost."""
    for i, block in enumerate(A.blocks(model, spec)):
        if A.get(block, spec.o).bias is not None or A.get(block, spec.down).bias is not None:
            raise PruneflowError(f"prune.units: subblocks: block {i}'s o_proj or down_proj has a bias, which a "
                                 f"removed sub-block would drop; prune heads and channels instead")
        if A.get(block, spec.q).out_features == 0 or A.get(block, spec.up).out_features == 0:
            raise PruneflowError(f"prune.units: subblocks: block {i} already lacks a sub-block; prune the dense "
                                 f"model")


def costs(shape: LayerShape) -> tuple[int, int]:
    """Parameters of one block's attention and of its MLP (what removing each takes away)."""
    return shape.heads * shape.head_cost + shape.kv_heads * shape.kv_cost, shape.channels * shape.channel_cost


def holds(plan: PrunePlan) -> bool:
    return False  # a sub-block plan is block widths: the block slicer applies it


def apply_plan(model: nn.Module, spec: ArchSpec, plan: PrunePlan, scores=None) -> None:
    raise AssertionError("sub-block plans are applied by pruneflow.units.apply")  # holds() is never true


def removal_plan(shapes: list[LayerShape], removed: list[tuple[int, int]]) -> list[LayerPlan]:
    """Every block's widths with the sub-blocks ``removed`` ((layer, 0: attention | 1: MLP)) gone."""
    gone = set(removed)
    return [LayerPlan(kept_heads=[] if (i, 0) in gone else list(range(s.heads)),
                      kept_kv_heads=[] if (i, 0) in gone else list(range(s.kv_heads)),
                      kept_channels=[] if (i, 1) in gone else list(range(s.channels)))
            for i, s in enumerate(shapes)]


def select(model: nn.Module, spec: ArchSpec, scores: Scores, cfg: SelectConfig, method: str = "",
           seed: int = 0) -> PrunePlan:
    """Remove sub-blocks in score order (lowest first) until the removed parameters are closest to
    ``cfg.ratio`` of the non-embedding ones."""
    ranked = scores.extra.get(NAME)
    shapes, params = layer_shapes(model, spec), A.count_parameters(model)
    if ranked is None or tuple(ranked.shape) != (len(shapes), 2):
        raise PruneflowError(f"prune.units: subblocks needs a method that scores sub-blocks (blockpruner), not "
                             f"{method or 'this one'}")
    target = cfg.ratio * params["non_embedding"]
    order = sorted(((float(ranked[i, k]), i, k) for i in range(len(shapes)) for k in (0, 1)))
    removed, total = [], 0
    for _, i, k in order:
        cost = costs(shapes[i])[k]
        if abs(total + cost - target) >= abs(total - target):
            break
        removed.append((i, k))
        total += cost
    plan = PrunePlan(method=method, ratio=cfg.ratio, allocation="global", head_mode=cfg.head_mode,
                     units=[NAME], round_to=cfg.round_to, reconstruct="none", seed=seed,
                     layers=removal_plan(shapes, removed))
    gone = removed_parameters(plan, shapes)
    plan.params = accounting(params, gone)
    return plan


def ranks(order: list[tuple[int, int]], n_layers: int) -> torch.Tensor:
    """(L, 2) scores from a removal order: the first removed scores lowest, the never removed 1."""
    out = torch.ones(n_layers, 2, dtype=torch.float64)
    for rank, (i, k) in enumerate(order):
        out[i, k] = -1.0 + rank / (2 * n_layers)
    return out
