"""Score → select → apply, the library's one pruning entry point."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pruneflow.model import arch as A
from pruneflow.units import reconstruct
from pruneflow.selection import search
from pruneflow import units
from pruneflow.execution import blockwise, streaming
from pruneflow.units.apply import apply, layer_shapes
from pruneflow.model.arch import ArchSpec
from pruneflow.errors import PruneflowError
from pruneflow.selection.iterations import IterationStore, compose, fingerprint
from pruneflow.execution.objectives import resolve as resolve_objective
from pruneflow.methods import CAUSAL_LM, METHODS, NORMS, OBJECTIVE, SCORERS
from pruneflow.methods.options import Options
from pruneflow.pipeline.params import PruneParams, check_method
from pruneflow.selection.plan import LayerPlan, PrunePlan, SelectConfig, accounting, removed_parameters
from pruneflow.execution.runtime import Runtime
from pruneflow.selection.scores import Scores

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    plan: PrunePlan
    scores: Scores
    seconds: dict[str, float] = field(default_factory=dict)
    iterations: list[dict] = field(default_factory=list)  # iterative methods: one summary per iteration
    reconstruction: list[dict] = field(default_factory=list)  # lstsq: per block, relative error before/after
    search: dict | None = None  # allocation search: start/best calibration loss, history


def score(model: nn.Module, spec: ArchSpec, method: str, windows: torch.Tensor | None, seed: int = 0,
          ratio: float | None = None, runtime: Runtime | None = None, **options) -> Scores:
    """Run a registered scorer. ``ratio`` is passed for methods whose choice depends on the target
    (``angular`` picks the contiguous block whose size meets it); ``options`` are method-specific."""
    model.eval()
    return SCORERS[method](model, spec, windows=windows, runtime=runtime or Runtime(), seed=seed, ratio=ratio,
                           **options)


def usable_methods(spec: ArchSpec) -> list[str]:
    """The methods whose own settings (``auto`` units, allocation, reconstruction) this architecture takes."""
    usable = []
    for name, entry in METHODS.items():
        if CAUSAL_LM in entry.needs and not spec.causal_lm:
            continue
        try:
            check_model(name, spec, PruneParams(ratio=0.5))
        except PruneflowError:
            continue
        usable.append(name)
    return usable


def check_model(method: str, spec: ArchSpec, cfg: PruneParams | None = None, objective: str = "auto") -> None:
    """Refuse a method, or with ``cfg`` an allocation, or an ``objective`` (``score.objective``) the model cannot
    be pruned with (before the model is loaded, calibration or any forward pass)."""
    if CAUSAL_LM in METHODS[method].needs and not spec.causal_lm:
        raise PruneflowError(f"method {method} needs gradients of the next-token loss and a causal LM; this model is "
                             f"an encoder: use {', '.join(usable_methods(spec))}")
    if cfg is not None:
        units.check_settings(spec, cfg.for_method(method), method)
    if NORMS in METHODS[method].needs and not spec.norms:
        raise PruneflowError(f"method {method} reads the outputs of each block's norms; this architecture's "
                             f"ArchSpec names none ({'an encoder' if not spec.causal_lm else 'no norms'}): use "
                             f"wanda_sp or flap for its heads and channels")
    if uses_objective(method, cfg):
        resolve_objective(objective, spec.causal_lm)
    elif objective != "auto":
        scorers = ", ".join(name for name, m in METHODS.items() if OBJECTIVE in m.needs)
        allocation = "" if cfg is None else f" with prune.allocation: {cfg.for_method(method).allocation}"
        raise PruneflowError(f"score.objective: {objective} measures candidate sub-models, and method {method}"
                             f"{allocation} scores none; it applies to {scorers} and to prune.allocation: search "
                             f"(or leave it auto)")


def uses_objective(method: str, cfg: PruneParams | None = None) -> bool:
    """Whether scoring or the allocation search measures candidates by ``score.objective``."""
    return OBJECTIVE in METHODS[method].needs or (cfg is not None and cfg.for_method(method).allocation == "search")


def check_streams(method: str, model: nn.Module | None = None) -> None:
    """Refuse a method that needs the whole model in memory for a streamed model (``model`` None: the model
    will be streamed)."""
    if (model is None or streaming.is_streamed(model)) and not METHODS[method].streams:
        streamed = ", ".join(name for name, m in METHODS.items() if m.streams)
        raise PruneflowError(f"method {method} needs the whole model in memory, which exceeds --max-memory; "
                             f"methods that stream a block at a time: {streamed}")


def check_units(model: nn.Module, spec: ArchSpec, cfg: PruneParams, method: str | None = None) -> None:
    """Units the architecture, the method or the ratio cannot give (``cfg`` resolved): an error before any
    forward pass."""
    units.check_settings(spec, cfg, method)
    units.claiming(cfg.units, spec).check_model(model, spec, cfg)


def select_config(cfg: PruneParams, scores: Scores) -> SelectConfig:
    """The selection settings of ``prune.*`` (resolved for the method; compensation only when the scorer
    provides activation means)."""
    reconstruct = "none" if cfg.reconstruct == "bias" and scores.attn_mean is None else cfg.reconstruct
    return SelectConfig(ratio=cfg.ratio, allocation=cfg.allocation, units=tuple(cfg.units), head_mode=cfg.head_mode,
                        round_to=cfg.round_to, reconstruct=reconstruct)


def prune(model: nn.Module, spec: ArchSpec, method: str, cfg: PruneParams, windows: torch.Tensor | None,
          seed: int = 0, options: Options | None = None, state_dir: Path | None = None,
          runtime: Runtime | None = None, objective: str = "auto") -> PruneResult:
    """Prune ``model`` in place; returns the plan (with exact parameter accounting) and timings.

    ``cfg``'s ``auto`` settings mean the method's own (``PruneParams.for_method``). Iterative methods (bonsai)
    take their ``options`` (default: the method's options model's defaults) and, with ``state_dir``, save every
    completed iteration there and resume from it. ``objective`` (``score.objective``) measures candidate
    sub-models where the method or the allocation search scores them (``auto``: the paper's).
    """
    try:
        check_method(method, cfg)
    except ValueError as err:
        raise PruneflowError(str(err)) from None
    check_model(method, spec, cfg, objective)
    check_streams(method, model)
    cfg, entry, runtime = cfg.for_method(method), METHODS[method], runtime or Runtime()
    check_units(model, spec, cfg, method)
    check_reconstruct(model, spec, cfg, windows, runtime)
    if entry.iterative:
        options = options or entry.options()
        return prune_iteratively(model, spec, method, cfg, windows, seed, options, state_dir, runtime,
                                 objective=objective)
    started = time.perf_counter()
    scores = score(model, spec, method, windows, seed, cfg.ratio, runtime,
                   **({"config": options or entry.options()} if entry.options else {}),
                   **({"objective": objective} if OBJECTIVE in entry.needs else {}))
    scores = means_for(model, spec, cfg, scores, windows, runtime)
    scored = time.perf_counter()
    plan, searched = choose(model, spec, method, cfg, scores, windows, runtime, seed, objective)
    fit = apply_plan(model, spec, plan, scores, windows, runtime)
    actual = A.count_parameters(model)["non_embedding"]
    if actual != plan.params["non_embedding_after"]:
        raise RuntimeError(f"parameter accounting is off: plan says {plan.params['non_embedding_after']}, "
                           f"model has {actual}")
    if abs(plan.params["achieved_ratio"] - cfg.ratio) > 0.02:
        log.warning("achieved ratio %.4f is more than 0.02 from the target %.4f (unit granularity)",
                    plan.params["achieved_ratio"], cfg.ratio)
    return PruneResult(plan=plan, scores=scores, reconstruction=fit, search=searched,
                       seconds={"score": scored - started, "select_apply": time.perf_counter() - scored})


def choose(model: nn.Module, spec: ArchSpec, method: str, cfg: PruneParams, scores: Scores,
           windows: torch.Tensor | None, runtime: Runtime, seed: int = 0, objective: str = "auto"
           ) -> tuple[PrunePlan, dict | None]:
    """The plan for ``scores`` (``cfg`` resolved for the method): select's rule, or the allocation search from
    the method's own plan, its candidates measured by ``objective`` (returns its summary too)."""
    unit = units.claiming(cfg.units, spec)
    if cfg.allocation != "search":
        return unit.select(model, spec, scores, select_config(cfg, scores), method, seed), None
    # the search moves block widths (heads, channels) between layers; the params check refuses it for the rest
    if windows is None:
        raise PruneflowError("prune.allocation: search needs calibration windows")
    start_cfg = select_config(cfg.model_copy(update={"allocation": METHODS[method].allocation}), scores)
    start = unit.select(model, spec, scores, start_cfg, method, seed)
    shapes, params = layer_shapes(model, spec), A.count_parameters(model)
    s = cfg.search
    result = search.search(model, spec, scores, shapes, params, select_config(cfg, scores), start, windows, runtime,
                           s.budget, s.windows, s.offspring, s.seed, method, objective)
    return result.plan, {"start_allocation": start_cfg.allocation,
                         "objective": resolve_objective(objective, spec.causal_lm), "start_loss": result.start_loss,
                         "best_loss": result.best_loss, "history": result.history}


def means_for(model: nn.Module, spec: ArchSpec, cfg: PruneParams, scores: Scores | None,
              windows: torch.Tensor | None, runtime: Runtime) -> Scores | None:
    """``scores`` with the dense model's input means when ``reconstruct: bias`` needs them and the scorer did
    not compute them (one calibration pass; ``scores`` None: an iterative method's composed plan)."""
    if cfg.reconstruct != "bias" or (scores is not None and scores.attn_mean is not None):
        return scores
    return reconstruct.with_means(scores or Scores([], []), *reconstruct.input_means(model, spec, windows, runtime),
                                  None, A.geometry(model.config).head_dim)


def apply_plan(model: nn.Module, spec: ArchSpec, plan: PrunePlan, scores: Scores | None,
               windows: torch.Tensor | None, runtime: Runtime) -> list[dict]:
    """Apply ``plan`` to the dense ``model`` with its reconstruction (bias: from ``scores``' means; lstsq: the
    re-fit, which returns its per-block report)."""
    if plan.reconstruct != "lstsq":
        apply(model, plan, spec, scores)
        return []
    if streaming.is_streamed(model):
        apply(model, plan, spec, scores)  # records the plan; the re-fit reads the dense blocks from the files
    return reconstruct.refit(model, spec, plan, scores, windows, runtime)


def check_reconstruct(model: nn.Module, spec: ArchSpec, cfg: PruneParams, windows: torch.Tensor | None,
                       runtime: Runtime) -> None:
    """Refuse a reconstruction that cannot work here, before any forward pass."""
    if cfg.reconstruct == "bias" and windows is None:
        raise PruneflowError("prune.reconstruct: bias needs calibration windows (the removed inputs' means)")
    if cfg.reconstruct == "lstsq":
        reconstruct.check(model, spec, windows, runtime)


def prune_iteratively(model: nn.Module, spec: ArchSpec, method: str, cfg: PruneParams, windows: torch.Tensor,
                      seed: int, options: Options, state_dir: Path | None = None,
                      runtime: Runtime | None = None, refit: bool = True, objective: str = "auto") -> PruneResult:
    """Repeat score → select → apply, each step removing ``prune_frac`` of the original non-embedding
    parameters (the last one what remains), until the achieved ratio is within ``tolerance`` of the target.

    ``reconstruct: bias`` adds each iteration's compensation as it goes (later iterations score the compensated
    model); ``lstsq`` re-fits once, at the end, against the dense blocks — unless ``refit`` is false (the
    pipeline's score stage: its prune stage re-applies the composed plan to the dense model and re-fits there)."""
    try:
        check_method(method, cfg)
    except ValueError as err:
        raise PruneflowError(str(err)) from None
    cfg, runtime = cfg.for_method(method), runtime or Runtime()
    started = time.perf_counter()
    shapes, params = layer_shapes(model, spec), A.count_parameters(model)
    original = params["non_embedding"]
    store = None
    if state_dir is not None:
        key = fingerprint(model, windows, {"method": method, "seed": seed, "prune": cfg.model_dump(),
                                           "options": options.model_dump(),
                                           **({"objective": objective} if objective != "auto" else {})})
        store = IterationStore(state_dir, key)
        if store.completed():
            log.info("resuming %s at iteration %d from %s", method, store.completed(), store.dir)
    head_dim = A.geometry(model.config).head_dim
    means = reconstruct.input_means(model, spec, windows, runtime) if cfg.reconstruct == "bias" else None
    dense = blockwise.dense_copy(model, spec) if cfg.reconstruct == "lstsq" and refit else None
    steps, summaries, scores = [], [], None
    while (removed := original - A.count_parameters(model)["non_embedding"]) < (cfg.ratio - options.tolerance) * original:
        k, current = len(steps), A.count_parameters(model)
        if store is not None and k < store.completed():
            plan, summary = store.load(k)
        else:
            step = min(options.prune_frac * original, cfg.ratio * original - removed)
            scores, plan, summary = _iteration(model, spec, method, cfg, windows, seed, options, k, step, runtime,
                                               objective)
            if store is not None:
                store.save(k, plan, summary, {name: value for name, value in scores.extra[method].items()
                                              if isinstance(value, torch.Tensor)})
        if plan.params["non_embedding_after"] == current["non_embedding"]:
            raise PruneflowError(f"{method} iteration {k} removed nothing: every remaining unit is protected; "
                                 f"lower prune.ratio or allow more unit types")
        # bias: each iteration adds the removed units' mean contribution (dense means, at the current indices)
        apply(model, plan, spec, None if means is None else
              reconstruct.with_means(Scores([], []), *means, compose(shapes, steps), head_dim))
        runtime.free()  # the sliced-away weights and the iteration's activations
        summary["achieved_ratio"] = (original - A.count_parameters(model)["non_embedding"]) / original
        steps.append(plan)
        summaries.append(summary)
    plan = PrunePlan(method=method, ratio=cfg.ratio, allocation="global", head_mode=cfg.head_mode,
                     units=list(cfg.units), round_to=cfg.round_to, reconstruct=cfg.reconstruct, seed=seed,
                     layers=[LayerPlan(**kept) for kept in compose(shapes, steps)])
    gone = removed_parameters(plan, shapes)
    plan.params = accounting(params, gone)  # params: the model before the first iteration
    if A.count_parameters(model)["non_embedding"] != plan.params["non_embedding_after"]:
        raise RuntimeError("parameter accounting is off: the composed plan does not match the pruned model")
    fit = reconstruct.refit(model, spec, plan, None, windows, runtime, dense=dense) \
        if cfg.reconstruct == "lstsq" and refit else []
    del dense
    return PruneResult(plan=plan, scores=scores, iterations=summaries, reconstruction=fit,
                       seconds={"score": time.perf_counter() - started, "select_apply": 0.0})


def _iteration(model: nn.Module, spec: ArchSpec, method: str, cfg: PruneParams, windows: torch.Tensor, seed: int,
               options: Options, k: int, step: float, runtime: Runtime, objective: str = "auto"
               ) -> tuple[Scores, PrunePlan, dict]:
    """Score the current model and select ``step`` parameters to remove (global allocation)."""
    began = time.perf_counter()
    scores = score(model, spec, method, windows, seed, cfg.ratio, runtime, config=options, iteration=k,
                   units=tuple(cfg.units), head_mode=cfg.head_mode,
                   **({"objective": objective} if OBJECTIVE in METHODS[method].needs else {}))
    current = A.count_parameters(model)
    plan = units.claiming(cfg.units, spec).select(
        model, spec, scores, SelectConfig(ratio=step / current["non_embedding"], allocation="global",
                                          units=tuple(cfg.units), head_mode=cfg.head_mode, round_to=cfg.round_to,
                                          reconstruct="bias" if cfg.reconstruct == "bias" else "none"), method, seed)
    record = scores.extra[method]
    summary = {"iteration": k, "seconds": time.perf_counter() - began, "sub_models": len(record["losses"]),
               "loss_min": float(record["losses"].min()), "loss_max": float(record["losses"].max()),
               "cv_tau": record["cv_tau"], "penalty": record["penalty"]}
    return scores, plan, summary
