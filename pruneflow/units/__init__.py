"""Units: what pruning removes, and how — the vocabulary, removal, and the units that select and apply themselves.

Owns the slicer that physically removes what a plan says from every block (``apply``: heads, channels, blocks,
and what a unit module hands it), virtual removal for sub-model and search scoring (``masking``: keep masks on
heads and channels), what replaces the removed units' contribution (``reconstruct``: a bias, or the lstsq re-fit of
o_proj/down_proj) and one module per unit type with its own selection, behind one protocol. Unit modules may
import the model room, selection (plans, scores) and the execution layer; nothing here imports a method module
(``experts`` reads the method registry's metadata) or the pipeline.

Every unit type is one module of this package behind one protocol, listed in ``MODULES`` in the order they
claim; the generic code (prune, apply, the pipeline's stages) asks the registry, never a unit by name:
    NAME                                  the unit it is
    claims(units, spec)                   whether it prunes ``prune.units`` on this architecture
    check_settings(spec, cfg, method)     refusals from params and the config alone (before the model loads)
    check_model(model, spec, cfg)         refusals that need the model (before any forward pass)
    select(model, spec, scores, cfg, method, seed) -> PrunePlan
    holds(plan)                           whether a plan removes this unit
    apply_plan(model, spec, plan, scores) physical removal
``blocks`` — heads, channels and whole layers, every block's ``LayerPlan`` — comes last: it claims what no other
unit claims and holds every plan no other unit holds. A unit whose plan is block widths (the sub-blocks: a
block's whole attention or MLP) selects itself and lets the block slicer apply it (its ``holds`` is false).
This package's ``__init__`` imports nothing heavy: params and the
method registry read its vocabulary without torch; the unit modules load on first use.

Unit types — ``prune.units``, the fields of ``Scores``, a layer's widths, Bonsai's modules:
    heads      attention heads (query heads; with GQA, removed as ``head_mode`` says)
    channels   MLP intermediate channels (one row of gate/up and one column of down each)
    layers     whole decoder blocks
    hidden     channels of the hidden (embedding) dimension every block shares: one column of the embedding,
               of every projection reading the residual stream and of the head, one row of o/down, one entry of
               every norm (Minitron); pruned on its own, the same channels everywhere
    experts    whole experts of Mixture-of-Experts blocks
    subblocks  a block's whole attention or whole MLP (BlockPruner), each a residual no-op once removed
    merged_layers  whole blocks folded into the block below them (LaCo's layer collapse)
Head modes — ``prune.head_mode``, how GQA heads are removed so every KV group keeps the same size:
    query      one query head from every KV group of a layer at a time
    group      one whole KV group (its KV head and its query heads) at a time
    auto       whichever of the two removes fewer parameters per step
Selection units — what ``plan.select`` ranks and removes, one of: a ``channel``, a ``query`` step, a
``group``, a ``layer``.
"""

import importlib

from pruneflow.errors import PruneflowError

UNIT_TYPES = ("heads", "channels", "layers", "hidden", "experts", "subblocks", "merged_layers")
WIDTH_UNITS = ("heads", "channels")
HEAD_MODES = ("auto", "query", "group")
ALLOCATIONS = ("uniform", "global", "search")  # search: pruneflow.selection.search, from the method's own plan
# what replaces the removed units' contribution (prune.reconstruct): nothing, their mean as a bias (FLAP), or a
# least-squares re-fit of the kept input columns of o_proj/down_proj (pruneflow.units.reconstruct)
RECONSTRUCTIONS = ("none", "bias", "lstsq")
ALIASES = {"mlp": "channels"}  # the name params files used before; still read

MODULES = ("hidden", "experts", "expert_channels", "subblocks", "merged_layers", "blocks")  # in the order they claim:
# ``blocks`` (heads, channels, layers: block widths) last, as it takes what no other claims or holds


OLD_KEPT = {"kept_layers": "layers", "kept_hidden": "hidden", "kept_experts": "experts",
            "kept_expert_channels": "expert_channels"}  # plan.json fields before ``kept``: still read


def kept_of(plan: dict) -> dict:
    """A plan.json's ``kept`` mapping (unit type → what it keeps), from a plan written with a field per unit too."""
    kept = dict(plan.get("kept") or {})
    kept.update({unit: plan[old] for old, unit in OLD_KEPT.items() if plan.get(old) is not None})
    return kept


def modules() -> list:
    """The unit modules (imported on first use)."""
    return [importlib.import_module(f"{__name__}.{name}") for name in MODULES]


def claiming(units, spec):
    """The unit module that prunes ``units`` (``prune.units``, resolved) on ``spec``'s architecture."""
    unit = next((unit for unit in modules() if unit.claims(tuple(units), spec)), None)
    if unit is None:  # the params model refuses an unknown name first; a library caller gets these words
        raise PruneflowError(f"prune.units: no unit type prunes {', '.join(units)}; the unit types are "
                             f"{', '.join(UNIT_TYPES)}")
    return unit


def holding(plan):
    """The unit module whose removal ``plan`` holds (the block widths unless another unit wrote it)."""
    return next(unit for unit in modules() if unit.holds(plan))


def check_settings(spec, cfg, method: str | None = None) -> None:
    """Every unit's refusals of ``cfg`` (resolved ``prune.*``) on this architecture, before the model loads."""
    for unit in modules():
        unit.check_settings(spec, cfg, method)


def alone(name: str, units) -> None:
    """Refuse ``units`` (``prune.units``) that put the unit ``name``, which is pruned on its own, with others."""
    if len(units) > 1:
        raise PruneflowError(f"prune.units: {name} is pruned on its own (units: [{name}]), not with "
                             f"{', '.join(u for u in units if u != name)}")
