"""Bonsai (Dery et al., "Everybody Prune Now"): unit importance from the losses of perturbed sub-models.

One call scores one iteration (``pruneflow.prune`` repeats it, slicing in between):
1. a prior per unit from calibration activations (``wanda_sp`` by default);
2. per module (a layer's heads or its MLP channels) the top (1 − 2f) units by prior are safe; the rest are
   candidates, drawn with probability ∝ (module max prior − prior);
3. ``sub_models`` virtual sub-models, in pairs: a draw drops some candidates of every module, its complement
   drops the module's other candidates; masks act on o_proj/down_proj inputs (``pruneflow.units.masking``), several
   sub-models per forward pass (masks in the batch dimension), no gradients, no weight copies;
4. each sub-model's score is −perplexity (or −loss) on the scoring windows;
5. a lasso y ≈ w·keep_mask + b, its penalty chosen by k-fold cross-validated Kendall τ; w is the importance
   (every penalty × fold in one batched FISTA solve on the runtime's device: :func:`pruneflow.methods.lasso.fit_cv`).

Head units are whole KV groups or single query heads, whichever selection removes (``plan.head_unit``).
Deviations from the reference code, each a parameter: a module with fewer than 2·k candidates gets more
(with 4 KV groups and f = 0.05 the paper's rule leaves one candidate per layer, which every draw drops and
every complement keeps, so those columns are identical across layers and their weights tie);
``drop_count: varied`` draws how many candidates a module drops (the paper's fixed count makes each module's
dropped total constant, so a module's overall level is confounded with the intercept); ``per_parameter``
ranks units by importance per parameter they remove (a KV group costs as much as ~64 MLP channels);
``shrink_to: prior`` makes the lasso estimate each unit's departure from its prior (scaled to the objective's
units per unit type), so units the sub-models cannot resolve keep the prior's order instead of tying at 0.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from pruneflow import methods  # the registry: SCORERS loads the method modules on first use
from pruneflow.model import arch as A
from pruneflow.execution import passes
from pruneflow.units.apply import layer_shapes
from pruneflow.errors import PruneflowError
from pruneflow.execution.candidates import Candidates
from pruneflow.methods.lasso import fit_cv
from pruneflow.methods.options import BonsaiParams
from pruneflow.selection.plan import head_unit, unit_cost
from pruneflow.execution.runtime import Runtime
from pruneflow.selection.scores import Scores

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Module:
    """A contiguous run of units in the flat unit vector: one layer's heads or its MLP channels."""
    layer: int
    kind: str  # "heads" | "channels"
    start: int
    count: int
    cost: int  # parameters one unit removes
    repeat: int  # query heads per unit (the group size for KV-group units), 1 for channels
    groups: int = 1  # query-head units: the KV groups they form (candidates are picked in every group)

    @property
    def span(self) -> slice:
        return slice(self.start, self.start + self.count)


def layout(model, spec, units: tuple[str, ...], head_mode: str) -> list[Module]:
    """The units Bonsai scores, in the order of the flat mask vector."""
    modules, start = [], 0
    for layer, shape in enumerate(layer_shapes(model, spec)):
        if "heads" in units:
            group = head_unit(head_mode, shape) == "group"
            count = shape.kv_heads if group else shape.heads
            cost = unit_cost("group", shape) if group else shape.head_cost
            modules.append(Module(layer, "heads", start, count, cost, shape.group_size if group else 1,
                                  1 if group else shape.kv_heads))
            start += count
        if "channels" in units:
            modules.append(Module(layer, "channels", start, shape.channels, shape.channel_cost, 1))
            start += shape.channels
    if not modules:
        raise PruneflowError("method bonsai scores heads and MLP channels: prune.units needs channels or heads")
    return modules


def unit_priors(model, spec, windows, runtime, modules: list[Module], prior: str, seed: int) -> torch.Tensor:
    """(N,) prior per unit from a one-shot method (a KV group's prior is its heads' mean)."""
    scores = methods.SCORERS[prior](model, spec, windows=windows, runtime=runtime, seed=seed)
    values = []
    for module in modules:
        if module.kind == "heads":
            values.append(scores.heads[module.layer].double().reshape(module.count, module.repeat).mean(1))
        else:
            values.append(scores.channels[module.layer].double())
    return torch.cat(values)


def candidate_count(count: int, prune_frac: float) -> tuple[int, int]:
    """(candidates, units a draw drops) in a module of ``count`` units; at least 2 candidates when possible."""
    drop = int(prune_frac * count) + 1
    safe = int((1 - 2 * prune_frac) * count)
    candidates = min(count - 1, max(count - safe, 2 * drop))
    return candidates, min(drop, candidates)


def lowest(prior: torch.Tensor, count: int, groups: int = 1) -> torch.Tensor:
    """Indices of the ``count`` lowest priors; with ``groups`` > 1, the lowest ⌈count / groups⌉ of every group
    (equal consecutive runs). Query heads leave in steps of one per KV group, so a step is only removable when
    every group has candidates: a layer-wide pool can leave some groups with none, and no step of that layer
    could ever be removed."""
    if groups == 1:
        return prior.argsort(stable=True)[:count]
    size = len(prior) // groups
    per_group = min(size - 1, -(-count // groups))
    return torch.cat([g * size + prior[g * size:(g + 1) * size].argsort(stable=True)[:per_group]
                      for g in range(groups)])


def sample_masks(modules: list[Module], priors: torch.Tensor, prune_frac: float, sub_models: int,
                 drop_count: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep masks (M, N) bool for ``sub_models`` sub-models in draw/complement pairs, and the (N,) candidates."""
    total = modules[-1].start + modules[-1].count
    candidates = torch.zeros(total, dtype=torch.bool)
    pools = []
    for module in modules:
        count, drop = candidate_count(module.count, prune_frac)
        prior = priors[module.span]
        if count == 0:  # a module down to one unit is never perturbed
            continue
        pool = module.start + lowest(prior, count, module.groups)
        if len(pool) == 0:  # one query head per KV group left: nothing removable in query steps
            continue
        drop = min(drop, len(pool))
        weights = prior.max() - priors[pool]
        weights = weights + 1e-6 * float(weights.max()) + 1e-12  # the top candidate still has a chance
        candidates[pool] = True
        pools.append((pool, weights, drop))
    keep = torch.ones(sub_models, total, dtype=torch.bool)
    for pair in range(sub_models // 2):
        for pool, weights, drop in pools:
            n_drop = int(torch.randint(0, len(pool) + 1, (), generator=generator)) if drop_count == "varied" else drop
            dropped = torch.zeros(len(pool), dtype=torch.bool)
            if n_drop:
                dropped[torch.multinomial(weights, n_drop, replacement=False, generator=generator)] = True
            keep[2 * pair, pool[dropped]] = False
            keep[2 * pair + 1, pool[~dropped]] = False
    return keep, candidates


def candidates_of(modules: list[Module], keep: torch.Tensor) -> Candidates:
    """(M, N) keep rows → the sub-models as per-layer (M, H_l) head and (M, I_l) channel keep masks (None for a
    unit type not scored)."""
    heads: dict[int, torch.Tensor] = {}
    channels: dict[int, torch.Tensor] = {}
    for module in modules:
        rows = keep[:, module.span]
        if module.kind == "heads":
            heads[module.layer] = rows.repeat_interleave(module.repeat, dim=1)
        else:
            channels[module.layer] = rows
    return Candidates(len(keep), heads=[heads[i] for i in sorted(heads)] or None,
                      channels=[channels[i] for i in sorted(channels)] or None)


def submodel_losses(model, spec, modules: list[Module], keep: torch.Tensor, windows: torch.Tensor,
                    rows_per_forward: int, runtime: Runtime | None = None, desc: str = "sub-models",
                    objective: passes.Objective | None = None) -> torch.Tensor:
    """(M,) mean next-token loss (or ``objective``'s measure) of each sub-model over ``windows`` (n, T).

    Rows of a forward pass are (sub-model, window) pairs, each computed with its own sub-model's masks;
    ``rows_per_forward = n`` is the naive one-sub-model-per-forward loop. How the passes run (in memory, streamed
    layer-major with each block read once per group of batches, or on Ray workers) is the execution layer's
    business (:func:`pruneflow.execution.losses`).
    """
    return passes.losses(model, spec, windows, candidates_of(modules, keep), runtime or Runtime(),
                         rows_per_forward, desc=desc, objective=objective)


def score(model, spec, windows, runtime=None, seed: int = 0, config: BonsaiParams | None = None, iteration: int = 0,
          units: tuple[str, ...] = ("channels", "heads"), head_mode: str = "auto", objective: str = "auto",
          **_) -> Scores:
    """One Bonsai iteration: importance of every candidate unit (+inf for this round's safe units). Sub-models are
    measured by ``objective`` (``score.objective``: auto is the paper's next-token loss, on an encoder the
    distance of the final hidden states to the unmasked model's)."""
    config, runtime = config or BonsaiParams(), runtime or Runtime()
    if len(windows) < config.n_windows:
        raise PruneflowError(f"score.bonsai.n_windows={config.n_windows} but the calibration set has "
                             f"{len(windows)} windows; raise calibrate.n_windows or lower it")
    modules = layout(model, spec, units, head_mode)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
    priors = unit_priors(model, spec, windows, runtime, modules, config.prior, seed * 1_000_003 + iteration)
    runtime.free()  # the prior's forward pass is done: its activations are not needed by the sub-models
    keep, candidates = sample_masks(modules, priors, config.prune_frac, config.sub_models, config.drop_count,
                                    generator)
    if not bool(candidates.any()):
        raise PruneflowError(f"bonsai iteration {iteration}: no {' or '.join(units)} left to remove (every module is "
                             f"at its smallest width); lower prune.ratio or allow more unit types")
    fit_windows = windows[: config.n_windows]
    measure = passes.objective(model, spec, fit_windows, runtime, objective)
    losses = submodel_losses(model, spec, modules, keep, fit_windows, config.rows_per_forward,
                             runtime, desc=f"bonsai iteration {iteration}", objective=measure)
    targets = -losses.clamp(max=math.log(1e8)).exp() if config.objective == "ppl" else -losses
    x = keep[:, candidates].double()
    offset = prior_baseline(modules, candidates, priors, x, targets) if config.shrink_to == "prior" else None
    fit = fit_cv(x, targets, folds=config.cv_folds, seed=seed + iteration, offset=offset, device=runtime.device)
    importance = torch.full((len(priors),), math.inf, dtype=torch.float64)
    importance[candidates] = fit.weights
    costs = torch.cat([torch.full((m.count,), float(m.cost), dtype=torch.float64) for m in modules])
    ranked = importance / costs if config.per_parameter else importance
    log.info("bonsai iteration %d: %d sub-models, loss %.4f–%.4f, held-out τ %.3f (penalty %.3g)", iteration,
             len(losses), float(losses.min()), float(losses.max()), fit.cv_tau, fit.penalty)
    return _scores(model, spec, modules, ranked, record={
        "keep": keep.to(torch.uint8), "losses": losses, "priors": priors, "importance": importance,
        "candidates": candidates.to(torch.uint8), "penalty": fit.penalty, "cv_tau": fit.cv_tau,
        "cv_table": fit.cv_table})


def prior_baseline(modules: list[Module], candidates: torch.Tensor, priors: torch.Tensor, x: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    """(P,) the candidates' priors in the objective's units: one non-negative scale per unit type (heads,
    channels), fitted by least squares of the targets on Σ prior of the units each sub-model keeps."""
    kinds = torch.cat([torch.full((m.count,), m.kind == "heads", dtype=torch.bool) for m in modules])[candidates]
    prior = priors[candidates].double()
    types = [t for t in (kinds, ~kinds) if t.any()]
    basis = torch.stack([x[:, t] @ prior[t] for t in types], 1)  # (M, types)
    basis, centred = basis - basis.mean(0), targets - targets.mean()
    scale = torch.linalg.lstsq(basis, centred[:, None]).solution[:, 0].clamp(min=0)  # (types,)
    baseline = torch.zeros_like(prior)
    for t, s in zip(types, scale):
        baseline[t] = prior[t] * s
    return baseline


def _scores(model, spec, modules: list[Module], ranked: torch.Tensor, record: dict) -> Scores:
    """Per-unit values → the per-query-head / per-channel Scores selection reads (one scale: comparable)."""
    widths = A.layer_widths(model, spec)
    heads = [torch.full((w["heads"],), math.inf) for w in widths]
    channels = [torch.full((w["channels"],), math.inf) for w in widths]
    for module in modules:
        values = ranked[module.span].float()
        if module.kind == "heads":
            heads[module.layer] = values.repeat_interleave(module.repeat)
        else:
            channels[module.layer] = values
    return Scores(heads=heads, channels=channels, comparable=True, extra={"bonsai": record})
