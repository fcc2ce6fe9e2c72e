"""The merged-layers unit: whole blocks folded into the block below them (LaCo's layer collapse).

A merge ``(base, m)`` replaces block ``base``'s projections (weights and biases of q, k, v, o, gate, up, down)
by a combination of its own and those of the ``m`` blocks after it, which are then removed; the base keeps its
norms. ``code`` (the default) is what LaCo's released notebooks compute (θ_base += θ_k − θ_base for each k in turn,
which telescopes to the top block's projections); ``paper`` is the paper's Reserving-Differences-while-Seeking-
Common, θ_base + Σ_k (θ_{base+k} − θ_base). Merges are steps over the model as merged so far, in order (a later one may fold
an already merged block). The result has fewer blocks of unchanged widths: a stock config (vanilla checkpoint,
the family's own GGUF architecture).

Scores carry the merges the method accepted (``Scores.extra["merges"]``, (k, 2) of base, m); the plan keeps them
(``plan.kept["merged_layers"]``) with the surviving blocks' original indices in ``plan.kept["layers"]``.
"""

from __future__ import annotations

import torch
from torch import nn

from pruneflow.model import arch as A, mlp
from pruneflow.units.apply import layer_shapes, remove_layers
from pruneflow.model.arch import ArchSpec
from pruneflow.errors import PruneflowError
from pruneflow.execution import streaming
from pruneflow.selection.plan import LayerPlan, accounting, PrunePlan, SelectConfig, removed_parameters
from pruneflow.selection.scores import Scores
from pruneflow.units import alone

NAME = "merged_layers"
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
FORMULAS = ("code", "paper")


def claims(units, spec: ArchSpec) -> bool:
    return NAME in units


def check_settings(spec: ArchSpec, cfg, method: str | None = None) -> None:
    """Merged layers alone, on dense blocks, without reconstruction (``cfg`` resolved)."""
    if not claims(cfg.units, spec):
        return
    alone(NAME, cfg.units)
    if mlp.of(spec) is not mlp.DENSE:
        raise PruneflowError("prune.units: merged_layers folds dense blocks; this is a Mixture-of-Experts model: "
                             "prune its experts or layers")
    if cfg.reconstruct != "none":
        raise PruneflowError(f"prune.reconstruct: {cfg.reconstruct} is for heads and channels; merged layers keep "
                             f"every width: use reconstruct: none (or auto)")


def check_model(model: nn.Module, spec: ArchSpec, cfg) -> None:
    """Blocks of one shape (a per-layer checkpoint's cannot be added), in memory."""
    if streaming.is_streamed(model):
        raise PruneflowError("prune.units: merged_layers adds blocks' weights in memory; this model is streamed "
                             "(above runtime.max_memory): raise the budget")
    shapes = {tuple(tuple(p.shape) for p in block.parameters()) for block in A.blocks(model, spec)}
    if len(shapes) > 1:
        raise PruneflowError("prune.units: merged_layers adds the weights of whole blocks, which needs every block "
                             "of the same widths; this checkpoint has per-layer widths: merge the dense model")


def projections(block: nn.Module, spec: ArchSpec) -> list[torch.Tensor]:
    """The tensors a merge combines: every weight and bias of the block's projections."""
    out = []
    for name in PROJECTIONS:
        path = getattr(spec, name)
        if path:
            linear = A.get(block, path)
            out += [linear.weight] + ([linear.bias] if linear.bias is not None else [])
    return out


@torch.no_grad()
def merged(blocks: list[nn.Module], spec: ArchSpec, formula: str = "code") -> list[torch.Tensor]:
    """The base's projections (``blocks[0]``) merged with those of the blocks after it, in float32 or wider."""
    base = [t if t.dtype.itemsize >= 4 else t.float() for t in projections(blocks[0], spec)]
    out = [t.clone() for t in base]
    for block in blocks[1:]:
        for acc, own, other in zip(out, base, projections(block, spec)):
            acc.add_(other.to(acc.dtype) - (own if formula == "paper" else acc))
    return out


@torch.no_grad()
def write(block: nn.Module, spec: ArchSpec, tensors: list[torch.Tensor]) -> None:
    for target, value in zip(projections(block, spec), tensors):
        target.copy_(value.to(target.dtype))


def holds(plan: PrunePlan) -> bool:
    return NAME in plan.kept


def survivors(n_layers: int, merges: list[list[int]]) -> list[int]:
    """The original indices of the blocks left after ``merges`` (steps over the model as merged so far)."""
    layers = list(range(n_layers))
    for base, m in merges:
        del layers[base + 1: base + 1 + m]
    return layers


def apply_plan(model: nn.Module, spec: ArchSpec, plan: PrunePlan, scores=None) -> None:
    formula = plan.kept[NAME].get("formula", "code")
    for base, m in plan.kept[NAME]["merges"]:
        blocks = A.blocks(model, spec)
        if base + m >= len(blocks):
            raise PruneflowError(f"plan merges blocks {base}..{base + m}; the model has {len(blocks)}")
        write(blocks[base], spec, merged(list(blocks[base: base + m + 1]), spec, formula))
        remove_layers(model, spec, [i for i in range(len(blocks)) if not base < i <= base + m])


def select(model: nn.Module, spec: ArchSpec, scores: Scores, cfg: SelectConfig, method: str = "",
           seed: int = 0) -> PrunePlan:
    """The plan of the merges the method accepted (``Scores.extra["merges"]``)."""
    merges = scores.extra.get("merges")
    if merges is None:
        raise PruneflowError(f"prune.units: merged_layers needs a method that merges layers (laco), not "
                             f"{method or 'this one'}")
    merges = [[int(base), int(m)] for base, m in merges.tolist()]
    formula = FORMULAS[int(scores.extra.get("merge_formula", torch.tensor(0)))]
    shapes, params = layer_shapes(model, spec), A.count_parameters(model)
    plan = PrunePlan(method=method, ratio=cfg.ratio, allocation="global", head_mode=cfg.head_mode, units=[NAME],
                     round_to=cfg.round_to, reconstruct="none", seed=seed,
                     layers=[LayerPlan.full(s.heads, s.kv_heads, s.channels) for s in shapes],
                     kept={"layers": survivors(len(shapes), merges),
                                           NAME: {"merges": merges, "formula": formula}})
    gone = removed_parameters(plan, shapes)
    plan.params = accounting(params, gone)
    return plan
