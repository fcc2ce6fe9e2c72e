"""``prune.allocation: search`` — how many heads and channels each layer loses, searched forward-only.

The scorer still decides *which* units go inside a layer (its ranking, as ``select`` uses it); the search
decides *how many* per layer, at the exact target: a (1 + λ) evolutionary search in the manner of EvoPress.
It starts from the plan of the method's own allocation (``auto``); each generation makes ``offspring``
children of the best allocation so far, each by one to three *switches* — one layer/unit type loses a step
(a head unit, or 1/32 of the layer's channels) and another gains one back — after which channels are added or
restored in random layers until the parameters removed are within half a channel of the target again. A child
replaces its parent only if its fitness is lower. Fitness is the mean next-token loss (``score.objective``: or
the KL to the dense model, or on an encoder the distance of the final hidden states) on ``windows``
calibration windows (a seeded subset of the calibration set; never test text), computed with per-layer masks
on the dense model (no weight copies; :mod:`pruneflow.units.masking`). ``budget`` counts the candidates evaluated,
the starting plan included: each is one forward pass over the fitness windows (streamed, a generation's
children share the passes over the blocks).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from pruneflow.execution import passes
from pruneflow.model.arch import ArchSpec
from pruneflow.errors import PruneflowError
from pruneflow.execution.candidates import Candidates
from pruneflow.selection.plan import (LayerShape, PrunePlan, SelectConfig, head_unit, plan_from_removed, ranked_units,
                                      removal_target, unit_cost)
from pruneflow.execution.runtime import Runtime
from pruneflow.selection.scores import Scores

log = logging.getLogger(__name__)

CHANNEL_STEP = 32  # a switch moves 1/32 of a layer's channels


@dataclass
class SearchResult:
    plan: PrunePlan
    history: list[dict]  # per generation: evaluated so far, best loss
    start_loss: float
    best_loss: float


def _counts(plan: PrunePlan, shapes: list[LayerShape], kinds: list[str]) -> list[dict[str, int]]:
    """Units of each kind a plan removes per layer: {"channel": n, "query"|"group": n}."""
    out = []
    for layer, shape, kind in zip(plan.layers, shapes, kinds):
        count = {"channel": shape.channels - len(layer.kept_channels)}
        if kind == "group":
            count["group"] = shape.kv_heads - len(layer.kept_kv_heads)
        else:
            count["query"] = shape.group_size - len(layer.kept_heads) // max(1, len(layer.kept_kv_heads))
        out.append(count)
    return out


class _Space:
    """What may change: per layer and unit kind, the step, its capacity and its cost."""

    def __init__(self, shapes: list[LayerShape], cfg: SelectConfig, kinds: list[str]):
        self.shapes, self.kinds = shapes, kinds
        self.keys = [(layer, "channel") for layer in range(len(shapes))]
        if "heads" in cfg.units:
            self.keys += [(layer, kind) for layer, kind in enumerate(kinds)]
        self.round_to = cfg.round_to

    def capacity(self, layer: int, kind: str) -> int:
        shape = self.shapes[layer]
        return {"channel": shape.channels - max(1, self.round_to), "group": shape.kv_heads - 1,
                "query": shape.group_size - 1}[kind]

    def step(self, layer: int, kind: str) -> int:
        if kind != "channel":
            return 1
        return max(self.round_to, self.shapes[layer].channels // CHANNEL_STEP)

    def cost(self, counts: list[dict[str, int]]) -> int:
        return sum(n * unit_cost(kind, self.shapes[layer]) for layer, count in enumerate(counts)
                   for kind, n in count.items())


def _mutate(counts: list[dict[str, int]], space: _Space, target: int, rng: random.Random) -> list[dict[str, int]]:
    child = [dict(c) for c in counts]
    for _ in range(rng.randint(1, 3)):
        for _attempt in range(20):
            (la, ka), (lb, kb) = rng.sample(space.keys, 2)
            up, down = space.step(la, ka), space.step(lb, kb)
            if child[la][ka] + up <= space.capacity(la, ka) and child[lb][kb] - down >= 0:
                child[la][ka] += up
                child[lb][kb] -= down
                break
    _rebalance(child, space, target, rng)
    return child


def _rebalance(counts: list[dict[str, int]], space: _Space, target: int, rng: random.Random) -> None:
    """Add or restore channels in random layers until the removed parameters are within half a channel of
    ``target``."""
    layers = list(range(len(space.shapes)))
    tolerance = max(shape.channel_cost for shape in space.shapes) / 2
    for _ in range(2 * len(layers) + 2):
        gap = target - space.cost(counts)  # > 0: remove more
        if abs(gap) <= tolerance:
            return
        rng.shuffle(layers)
        for layer in layers:
            want = round(gap / space.shapes[layer].channel_cost)
            have = counts[layer]["channel"]
            move = min(want, space.capacity(layer, "channel") - have) if want > 0 else max(want, -have)
            if move:
                counts[layer]["channel"] += move
                break
        else:
            return


def candidates_of(plans: list[PrunePlan], shapes: list[LayerShape]) -> Candidates:
    """The plans as keep masks on the dense model, one candidate each."""
    heads = [torch.zeros(len(plans), shape.heads, dtype=torch.bool) for shape in shapes]
    channels = [torch.zeros(len(plans), shape.channels, dtype=torch.bool) for shape in shapes]
    for row, plan in enumerate(plans):
        for layer, kept in enumerate(plan.layers):
            heads[layer][row, kept.kept_heads] = True
            channels[layer][row, kept.kept_channels] = True
    return Candidates(len(plans), heads=heads, channels=channels)


def masked_loss(model: nn.Module, spec: ArchSpec, plan: PrunePlan, shapes: list[LayerShape],
                windows: torch.Tensor, runtime: Runtime, objective: passes.Objective | None = None) -> float:
    """Mean next-token loss (or ``objective``'s measure) of ``windows`` with what ``plan`` removes masked out of
    the dense ``model``."""
    return masked_losses(model, spec, [plan], shapes, windows, runtime, objective)[0]


def masked_losses(model: nn.Module, spec: ArchSpec, plans: list[PrunePlan], shapes: list[LayerShape],
                  windows: torch.Tensor, runtime: Runtime, objective: passes.Objective | None = None) -> list[float]:
    """:func:`masked_loss` of each plan: one forward pass each over ``windows`` (the execution layer decides
    how: in memory, streamed with a generation's children sharing the passes over the blocks, or on workers)."""
    return passes.losses(model, spec, windows, candidates_of(plans, shapes), runtime,
                         desc="allocation search", objective=objective).tolist()


def search(model: nn.Module, spec: ArchSpec, scores: Scores, shapes: list[LayerShape], params: dict[str, int],
           cfg: SelectConfig, start: PrunePlan, windows: torch.Tensor, runtime: Runtime, budget: int,
           fitness_windows: int, offspring: int, seed: int, method: str = "", objective: str = "auto"
           ) -> SearchResult:
    """Search the per-layer counts from ``start`` (see the module docstring); returns the best plan found.
    Candidates are measured by ``objective`` (``score.objective``; auto: next-token loss, on an encoder the
    distance of the final hidden states to the dense model's)."""
    if budget < 1:
        raise PruneflowError("prune.search.budget must be at least 1 (candidates evaluated)")
    if "channels" not in cfg.units:
        raise PruneflowError("prune.allocation: search balances the exact ratio with MLP channels; "
                             "add channels to prune.units")
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(windows)), min(fitness_windows, len(windows))))
    fit = windows[picked]
    measure = passes.objective(model, spec, fit, runtime, objective)
    kinds = [head_unit(cfg.head_mode, shape) for shape in shapes]
    space = _Space(shapes, cfg, kinds)
    target = removal_target(shapes, params["non_embedding"], cfg)
    order = ranked_units(scores, shapes, cfg)

    def plan_of(counts):
        removed = {}
        for layer, count in enumerate(counts):
            for kind, n in count.items():
                if kind == "query":
                    removed[(layer, kind)] = list(range(n))
                elif n:
                    removed[(layer, kind)] = order[(layer, kind)][:n]
        return plan_from_removed(scores, shapes, params, cfg, removed, method, seed)

    parent = _counts(start, shapes, kinds)
    parent_plan = plan_of(parent)
    parent_loss = start_loss = masked_loss(model, spec, parent_plan, shapes, fit, runtime, measure)
    evaluated, history = 1, [{"evaluated": 1, "loss": start_loss}]
    bar = tqdm(total=budget, initial=1, desc="allocation search", unit="candidate", leave=False)
    while evaluated < budget:
        children = [_mutate(parent, space, target, rng) for _ in range(min(offspring, budget - evaluated))]
        child_plans = [plan_of(child) for child in children]
        losses = masked_losses(model, spec, child_plans, shapes, fit, runtime, measure)
        evaluated += len(children)
        bar.update(len(children))
        best = min(zip(losses, range(len(children))))  # the first of equal losses, as before
        best = (best[0], children[best[1]], child_plans[best[1]])
        if best[0] < parent_loss:
            parent_loss, parent, parent_plan = best
        history.append({"evaluated": evaluated, "loss": parent_loss})
        bar.set_postfix(loss=f"{parent_loss:.4f}")
        runtime.release_host()
    bar.close()
    log.info("allocation search: calibration loss %.4f → %.4f over %d candidates", start_loss, parent_loss, evaluated)
    parent_plan.allocation = "search"
    return SearchResult(plan=parent_plan, history=history, start_loss=start_loss, best_loss=parent_loss)
