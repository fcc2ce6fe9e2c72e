"""Score → select → apply, the library's one pruning entry point."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from pruneflow import arch as A
from pruneflow.apply import apply, layer_shapes
from pruneflow.arch import ArchSpec
from pruneflow.methods import SCORERS
from pruneflow.params import PruneParams
from pruneflow.plan import PrunePlan, SelectConfig, select
from pruneflow.scores import Scores

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    plan: PrunePlan
    scores: Scores
    seconds: dict[str, float] = field(default_factory=dict)


def score(model: nn.Module, spec: ArchSpec, method: str, windows: torch.Tensor | None, seed: int = 0,
          ratio: float | None = None) -> Scores:
    """Run a registered scorer. ``ratio`` is passed for methods whose choice depends on the target
    (``angular`` picks the contiguous block whose size meets it)."""
    model.eval()
    return SCORERS[method](model, spec, windows=windows, seed=seed, ratio=ratio)


def prune(model: nn.Module, spec: ArchSpec, method: str, cfg: PruneParams, windows: torch.Tensor | None,
          seed: int = 0) -> PruneResult:
    """Prune ``model`` in place; returns the plan (with exact parameter accounting) and timings."""
    started = time.perf_counter()
    scores = score(model, spec, method, windows, seed, cfg.ratio)
    scored = time.perf_counter()
    plan = select(scores, layer_shapes(model, spec), A.count_parameters(model),
                  SelectConfig(ratio=cfg.ratio, allocation=cfg.allocation, units=tuple(cfg.units),
                               head_mode=cfg.head_mode, round_to=cfg.round_to,
                               compensate=cfg.compensate and scores.attn_mean is not None),
                  method=method, seed=seed)
    apply(model, plan, spec, scores)
    actual = A.count_parameters(model)["non_embedding"]
    if actual != plan.params["non_embedding_after"]:
        raise RuntimeError(f"parameter accounting is off: plan says {plan.params['non_embedding_after']}, "
                           f"model has {actual}")
    if abs(plan.params["achieved_ratio"] - cfg.ratio) > 0.02:
        log.warning("achieved ratio %.4f is more than 0.02 from the target %.4f (unit granularity)",
                    plan.params["achieved_ratio"], cfg.ratio)
    return PruneResult(plan=plan, scores=scores,
                       seconds={"score": scored - started, "select_apply": time.perf_counter() - scored})
