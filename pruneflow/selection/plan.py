"""Selection: scores → a JSON-serialisable PrunePlan of what every layer keeps.

Units are MLP channels and attention heads. With GQA, heads are removed either as whole KV groups
(``head_mode="group"``) or as query heads within groups, the same number from every group of a layer
(``head_mode="query"``), so each layer keeps equal group sizes; ``auto`` picks the finer of the two.
Parameter accounting is exact (biases included); the target is a fraction of the non-embedding parameters.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from pruneflow.errors import PruneflowError
from pruneflow.units import OLD_KEPT, kept_of
from pruneflow.selection.scores import Scores, zscore


@dataclass
class LayerPlan:
    kept_heads: list[int]
    kept_kv_heads: list[int]
    kept_channels: list[int]

    @classmethod
    def full(cls, heads: int, kv_heads: int, channels: int) -> "LayerPlan":
        """A block that keeps its whole width."""
        return cls(list(range(heads)), list(range(kv_heads)), list(range(channels)))


@dataclass
class PrunePlan:
    method: str
    ratio: float
    allocation: str
    head_mode: str
    units: list[str]
    round_to: int
    reconstruct: str  # none | bias (a compensation bias is part of the plan's parameters) | lstsq
    seed: int
    layers: list[LayerPlan]
    params: dict = field(default_factory=dict)  # before/after/achieved ratio, filled by select
    # what the plan keeps beyond block widths, one entry per unit type (absent: all of it kept) —
    #   layers           the blocks kept (``layers`` above still has one entry per block of the dense model)
    #   hidden           the hidden channels kept (pruneflow.units.hidden)
    #   experts          per block, the experts kept (pruneflow.units.experts)
    #   expert_channels  per block and expert, the channels kept (pruneflow.units.expert_channels)
    #   merged_layers    {"merges": [[base, m], ...], "formula": ...} (pruneflow.units.merged_layers)
    kept: dict = field(default_factory=dict)

    @property
    def kept_layers(self) -> list[int] | None:
        return self.kept.get("layers")

    @property
    def kept_hidden(self) -> list[int] | None:
        return self.kept.get("hidden")

    @property
    def kept_experts(self) -> list[list[int]] | None:
        return self.kept.get("experts")

    @property
    def kept_expert_channels(self) -> list[list[list[int]]] | None:
        return self.kept.get("expert_channels")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> "PrunePlan":
        data = dict(data)
        if "compensate" in data:  # plans written before prune.reconstruct
            data["reconstruct"] = "bias" if data.pop("compensate") else "none"
        data["layers"] = [LayerPlan(**layer) for layer in data["layers"]]
        data["kept"] = kept_of(data)  # plans written with a field per unit
        for old in OLD_KEPT:
            data.pop(old, None)
        return cls(**data)

    @classmethod
    def load(cls, path: Path) -> "PrunePlan":
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class LayerShape:
    """What selection needs to know of one layer: widths and the parameter cost of each unit."""

    heads: int
    kv_heads: int
    channels: int
    head_cost: int  # one query head: its q rows (+bias) and o columns
    kv_cost: int  # one KV head: its k and v rows (+biases)
    channel_cost: int  # one MLP channel: gate/up rows (+biases) and the down column
    hidden: int
    o_bias: bool
    down_bias: bool
    fixed_cost: int = 0  # parameters of the block outside any width unit (norms, o/down biases)

    @property
    def block_cost(self) -> int:
        return (self.heads * self.head_cost + self.kv_heads * self.kv_cost + self.channels * self.channel_cost
                + self.fixed_cost)

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class SelectConfig:
    ratio: float
    allocation: str = "global"  # "uniform" | "global"
    units: tuple[str, ...] = ("channels", "heads")
    head_mode: str = "auto"  # "auto" | "query" | "group"
    round_to: int = 1
    reconstruct: str = "none"

    @property
    def compensate(self) -> bool:  # compensation biases count in the parameter target
        return self.reconstruct == "bias"


@dataclass
class _Unit:
    layer: int
    kind: str  # a selection unit (pruneflow.units): "channel" | "query" | "group" | "layer"
    index: int
    score: float
    cost: int


def _units(scores: Scores, shapes: list[LayerShape], cfg: SelectConfig) -> list[_Unit]:
    units: list[_Unit] = []
    if "layers" in cfg.units:
        if scores.layers is None:
            raise PruneflowError("prune.units: 'layers' needs a depth method (block_influence, angular, sleb)")
        units += [_Unit(layer, "layer", 0, float(s), unit_cost("layer", shape))
                  for layer, (shape, s) in enumerate(zip(shapes, scores.layers.tolist()))]
    width = [u for u in cfg.units if u != "layers"]
    if width and not scores.heads:
        raise PruneflowError(f"prune.units: this method scores whole layers only; use units [layers], not {width}")
    if width and "layers" in cfg.units and not scores.comparable:
        raise PruneflowError("prune.units: combining layers with heads/channels needs scores on one scale")
    for layer, shape in enumerate(shapes if width else []):
        if "channels" in cfg.units:
            units += [_Unit(layer, "channel", j, float(s), unit_cost("channel", shape))
                      for j, s in enumerate(scores.channels[layer].tolist())]
        if "heads" in cfg.units:
            per_group = scores.heads[layer].reshape(shape.kv_heads, shape.group_size)  # (G, heads per group)
            if head_unit(cfg.head_mode, shape) == "group":
                group_scores = per_group.mean(1)  # (G,)
                if scores.kv_heads is not None:  # what a KV head adds, shared by its group's query heads
                    group_scores = group_scores + scores.kv_heads[layer].to(group_scores.dtype) / shape.group_size
                units += [_Unit(layer, "group", g, float(s), unit_cost("group", shape))
                          for g, s in enumerate(group_scores.tolist())]
            else:  # query step r removes the r-th weakest query head of every group
                ranked = per_group.sort(dim=1).values.mean(0)  # (heads per group,)
                units += [_Unit(layer, "query", r, float(s), unit_cost("query", shape))
                          for r, s in enumerate(ranked.tolist())]
    return units


def _standardize(scores: Scores) -> Scores:
    """Z-score each layer's head scores and channel scores so they compare across layers and modules."""
    return replace(scores, heads=[zscore(h.double()) for h in scores.heads],
                   channels=[zscore(c.double()) for c in scores.channels], comparable=True)


def head_unit(head_mode: str, shape: LayerShape) -> str:
    """The head unit of a layer, "group" or "query"; ``auto`` picks the finer: a whole KV group, or one query
    head from every group."""
    if shape.group_size == 1:
        return "group"
    if head_mode != "auto":
        return head_mode
    return "query" if unit_cost("query", shape) < unit_cost("group", shape) else "group"


def unit_cost(kind: str, shape: LayerShape) -> int:
    """Parameters one unit removes: a channel, a query step (one query head per group), a KV group, a block."""
    return {"channel": shape.channel_cost, "query": shape.kv_heads * shape.head_cost,
            "group": shape.kv_cost + shape.group_size * shape.head_cost, "layer": shape.block_cost}[kind]


def _capacity(kind: str, shape: LayerShape) -> int:
    """How many units of a kind may go before the module would be empty."""
    if kind == "layer":
        return 1  # a block goes at most once; keeping one block overall is checked by the caller
    return {"channel": shape.channels, "group": shape.kv_heads, "query": shape.group_size}[kind] - 1


def removal_target(shapes: list[LayerShape], non_embedding: int, cfg: SelectConfig) -> int:
    """Parameters to remove so that, after any compensation biases are added, ``ratio`` is met."""
    added = 0
    if cfg.compensate:
        added = sum(s.hidden * (("heads" in cfg.units and not s.o_bias) + ("channels" in cfg.units and not s.down_bias))
                    for s in shapes)
    return round(cfg.ratio * non_embedding) + added


def _select_global(units: list[_Unit], shapes: list[LayerShape], target: int) -> dict:
    removed: dict[tuple[int, str], list[int]] = {}
    total = 0
    slack = min(u.cost for u in units) / 2
    for unit in sorted(units, key=lambda u: (u.score, u.layer, u.index)):
        if total >= target or unit.score == math.inf:  # +inf: a unit the scorer keeps this round
            break
        taken = removed.setdefault((unit.layer, unit.kind), [])
        if len(taken) >= _capacity(unit.kind, shapes[unit.layer]) or removed.get((unit.layer, "layer")):
            continue  # never empty a module; the next unit elsewhere is taken instead
        cost = unit.cost
        if unit.kind == "layer":
            if sum(bool(removed.get((i, "layer"))) for i in range(len(shapes))) == len(shapes) - 1:
                continue  # keep at least one block
            cost -= sum(len(done) * unit_cost(kind, shapes[unit.layer])  # width units already taken in it
                        for (layer, kind), done in removed.items() if layer == unit.layer and kind != "layer")
        if total + cost > target + slack:
            continue  # a coarse unit (a query step, a block) would overshoot; finer units fill the rest
        taken.append(len(taken) if unit.kind == "query" else unit.index)
        total += cost
    return removed


def _select_uniform(units: list[_Unit], shapes: list[LayerShape], target: int, cfg: SelectConfig) -> dict:
    if any(u.kind == "layer" for u in units):  # depth has no per-layer share: whole blocks are ranked
        return _select_global(units, shapes, target)
    by_key: dict[tuple[int, str], list[_Unit]] = {}
    for unit in units:
        by_key.setdefault((unit.layer, unit.kind), []).append(unit)
    prunable = sum(u.cost for u in units)
    fraction = target / prunable
    removed: dict[tuple[int, str], list[int]] = {}
    heads_removed = 0
    for (layer, kind), members in by_key.items():
        if kind == "channel":
            continue
        count = round(fraction * len(members))
        _refuse_empty(kind, layer, count, shapes[layer], cfg)
        chosen = sorted(members, key=lambda u: (u.score, u.index))[:count]
        removed[(layer, kind)] = list(range(count)) if kind == "query" else [u.index for u in chosen]
        heads_removed += sum(u.cost for u in chosen)
    channel_keys = [key for key in by_key if key[1] == "channel"]
    if channel_keys:
        channel_params = sum(u.cost for key in channel_keys for u in by_key[key])
        share = max(0, target - heads_removed) / channel_params
        for key in channel_keys:
            count = round(share * len(by_key[key]))
            _refuse_empty("channel", key[0], count, shapes[key[0]], cfg)
            removed[key] = [u.index for u in sorted(by_key[key], key=lambda u: (u.score, u.index))[:count]]
    return removed


def _refuse_empty(kind: str, layer: int, count: int, shape: LayerShape, cfg: SelectConfig) -> None:
    if count > _capacity(kind, shape):
        what = "MLP channels" if kind == "channel" else "attention heads"
        raise PruneflowError(
            f"prune.ratio={cfg.ratio} with allocation=uniform would remove all {what} of layer {layer}; "
            f"lower the ratio, prune fewer unit types, or use allocation=global")


def _round_channels(removed: list[int], scores: torch.Tensor, shape: LayerShape, round_to: int,
                    layer: int) -> list[int]:
    """Re-pick removed channels so the kept width is the multiple of ``round_to`` nearest the selected one (ties:
    the smaller), or the layer's own width when that is nearer: never more channels than the layer has."""
    if round_to <= 1:
        return removed
    if round_to > shape.channels:
        raise PruneflowError(f"prune.round_to={round_to} is larger than layer {layer}'s MLP width "
                             f"({shape.channels} channels)")
    want = shape.channels - len(removed)
    widths = [*range(round_to, shape.channels + 1, round_to), shape.channels]
    kept = min(widths, key=lambda width: (abs(width - want), width))
    order = sorted(range(shape.channels), key=lambda j: (float(scores[j]), j))
    return order[: shape.channels - kept]


def _layer_plan(layer: int, shape: LayerShape, removed: dict, scores: Scores, cfg: SelectConfig) -> LayerPlan:
    gone_channels = set(_round_channels(removed.get((layer, "channel"), []), scores.channels[layer], shape,
                                        cfg.round_to, layer) if "channels" in cfg.units else [])
    if not scores.heads:  # depth-only plan: every kept block keeps its full width
        return LayerPlan.full(shape.heads, shape.kv_heads, shape.channels)
    gone_groups = set(removed.get((layer, "group"), []))
    query_steps = len(removed.get((layer, "query"), []))
    per_group = scores.heads[layer].reshape(shape.kv_heads, shape.group_size)
    kept_heads: list[int] = []
    kept_kv = [g for g in range(shape.kv_heads) if g not in gone_groups]
    for g in kept_kv:
        strongest = per_group[g].argsort(descending=True, stable=True)[: shape.group_size - query_steps]
        kept_heads += sorted(g * shape.group_size + int(h) for h in strongest)
    return LayerPlan(kept_heads=kept_heads, kept_kv_heads=kept_kv,
                     kept_channels=[j for j in range(shape.channels) if j not in gone_channels])


def removed_parameters(plan: PrunePlan, shapes: list[LayerShape]) -> int:
    """Exact parameters a plan removes (net of compensation biases it adds)."""
    total = 0
    kept_blocks = set(range(len(shapes)) if plan.kept_layers is None else plan.kept_layers)
    for index, (layer, shape) in enumerate(zip(plan.layers, shapes)):
        if index not in kept_blocks:
            total += shape.block_cost
            continue
        lost_heads = shape.heads - len(layer.kept_heads)
        lost_channels = shape.channels - len(layer.kept_channels)
        total += lost_heads * shape.head_cost + (shape.kv_heads - len(layer.kept_kv_heads)) * shape.kv_cost
        total += lost_channels * shape.channel_cost
        if plan.reconstruct == "bias":
            total -= shape.hidden * ((lost_heads > 0 and not shape.o_bias) + (lost_channels > 0 and not shape.down_bias))
    return total



def accounting(params: dict[str, int], gone: int, embedding_gone: int = 0) -> dict:
    """A plan's ``params``: the parameters before and after removing ``gone`` non-embedding ones (and
    ``embedding_gone`` of the embedding and head), and the achieved ratio."""
    return {"total_before": params["total"], "total_after": params["total"] - gone - embedding_gone,
            "non_embedding_before": params["non_embedding"], "non_embedding_after": params["non_embedding"] - gone,
            "achieved_ratio": gone / params["non_embedding"]}


def select(scores: Scores, shapes: list[LayerShape], params: dict[str, int], cfg: SelectConfig,
           method: str = "", seed: int = 0) -> PrunePlan:
    """Choose what to keep so that ``cfg.ratio`` of the non-embedding parameters are removed."""
    if not 0 < cfg.ratio < 1 or math.isnan(cfg.ratio):
        raise PruneflowError(f"prune.ratio: must be in (0, 1), got {cfg.ratio}")
    if cfg.allocation == "global" and not scores.comparable:
        scores = _standardize(scores)
    units = _units(scores, shapes, cfg)
    if not units:
        raise PruneflowError(f"prune.units: nothing to prune in {list(cfg.units)}")
    target = removal_target(shapes, params["non_embedding"], cfg)
    if cfg.allocation == "global":
        removed = _select_global(units, shapes, target)
    elif cfg.allocation == "uniform":
        removed = _select_uniform(units, shapes, target, cfg)
    else:
        raise PruneflowError(f"prune.allocation: {cfg.allocation} is not a selection rule (search: prune.prune)")
    return plan_from_removed(scores, shapes, params, cfg, removed, method, seed)


def ranked_units(scores: Scores, shapes: list[LayerShape], cfg: SelectConfig) -> dict[tuple[int, str], list[int]]:
    """Per (layer, unit kind), the unit indices weakest first, as selection ranks them (query steps: in order)."""
    if not scores.comparable:
        scores = _standardize(scores)
    by_key: dict[tuple[int, str], list[_Unit]] = {}
    for unit in _units(scores, shapes, cfg):
        by_key.setdefault((unit.layer, unit.kind), []).append(unit)
    return {key: [u.index for u in sorted(members, key=lambda u: (u.score, u.index))]
            for key, members in by_key.items()}


def plan_from_removed(scores: Scores, shapes: list[LayerShape], params: dict[str, int], cfg: SelectConfig,
                      removed: dict, method: str = "", seed: int = 0) -> PrunePlan:
    """The plan that removes ``removed`` ({(layer, kind): indices}; query steps: ``range(n)``), with its exact
    parameter accounting."""
    if cfg.allocation == "global" and not scores.comparable:
        scores = _standardize(scores)
    plan = PrunePlan(method=method, ratio=cfg.ratio, allocation=cfg.allocation, head_mode=cfg.head_mode,
                     units=list(cfg.units), round_to=cfg.round_to, reconstruct=cfg.reconstruct, seed=seed,
                     layers=[_layer_plan(i, s, removed, scores, cfg) for i, s in enumerate(shapes)])
    if "layers" in cfg.units:
        plan.kept["layers"] = [i for i in range(len(shapes)) if not removed.get((i, "layer"))]
    gone = removed_parameters(plan, shapes)
    plan.params = accounting(params, gone)
    return plan
