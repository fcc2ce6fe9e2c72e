"""The block-width unit: attention heads, MLP channels and whole blocks — what every block keeps.

A plan of this unit is one ``LayerPlan`` per block (the query heads, KV heads and MLP channels it keeps) and the
blocks kept whole (``kept_layers``). ``select`` is :func:`pruneflow.selection.plan.select`'s rule: the
selectable groups of every block — a channel, a query head or a whole KV group as ``prune.head_mode`` says, a
block — ranked uniformly per layer or globally, until the removed parameters reach the ratio (``prune.allocation:
search`` then moves heads and channels between layers from that plan: :mod:`pruneflow.selection.search`).
``apply_plan`` is the block slicer (:func:`pruneflow.units.apply.slice_blocks`, which streams a block at a time
and adds FLAP's compensation bias).

It is the unit the others fall back on, so it is registered last: it claims any mix of heads, channels and
layers that no other unit claims first (a Mixture-of-Experts model's channels are its experts' own,
``expert_channels``), and it holds every plan no other unit holds — the sub-block unit's plans too, whose removed
attention or MLP is a block width of zero. Its settings are checked with the params
(:func:`pruneflow.pipeline.params.check_method`): nothing is left to refuse from the model.
"""

from __future__ import annotations

from torch import nn

from pruneflow.model import arch as A
from pruneflow.model.arch import ArchSpec
from pruneflow.selection.plan import PrunePlan, SelectConfig, select as select_widths
from pruneflow.selection.scores import Scores
from pruneflow.units.apply import layer_shapes, slice_blocks

NAME = "blocks"
UNITS = ("heads", "channels", "layers")


def claims(units, spec: ArchSpec) -> bool:
    return set(units) <= set(UNITS)


def check_settings(spec: ArchSpec, cfg, method: str | None = None) -> None:
    """Nothing beyond the params check (``check_method``: units the method scores, search and reconstruction)."""


def check_model(model: nn.Module, spec: ArchSpec, cfg) -> None:
    """Any block the per-layer loader describes can be sliced further: nothing to refuse."""


def select(model: nn.Module, spec: ArchSpec, scores: Scores, cfg: SelectConfig, method: str = "",
           seed: int = 0) -> PrunePlan:
    return select_widths(scores, layer_shapes(model, spec), A.count_parameters(model), cfg, method=method, seed=seed)


def holds(plan: PrunePlan) -> bool:
    return True  # asked last: a plan no other unit holds is block widths


def apply_plan(model: nn.Module, spec: ArchSpec, plan: PrunePlan, scores: Scores | None = None) -> None:
    slice_blocks(model, plan, spec, scores)
