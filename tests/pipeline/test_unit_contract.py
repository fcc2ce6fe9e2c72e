"""Every registered unit module × every family it prunes, through the registry alone: a method that scores the
unit prunes a tiny model of the family, and then
- the plan is held by the unit that claimed the setting (or by the block slicer, for a unit whose plan is block
  widths: the sub-blocks);
- the parameters the plan says the model has are the parameters it has, and fewer than before;
- plan.json, read back and applied to the dense model, gives the pruned model's outputs exactly;
- the checkpoint saved and loaded again (vanilla, or pruneflow's per-layer loader) gives them too.
A new unit module is in this suite as soon as it is in ``units.MODULES`` and a registered method scores it."""

import json

import pytest
import torch

from conftest import tiny_bert, tiny_causal_lm, tiny_moe
from pruneflow import units
from pruneflow.errors import PruneflowError
from pruneflow.methods import METHODS
from pruneflow.model import arch as A
from pruneflow.model import checkpoint
from pruneflow.pipeline.params import PruneParams, check_method
from pruneflow.prune import check_model, prune
from pruneflow.selection.plan import PrunePlan
from pruneflow.units.apply import apply

FAMILIES = {"llama": lambda: tiny_causal_lm("llama", num_hidden_layers=4),
            "mistral": lambda: tiny_causal_lm("mistral", num_hidden_layers=4),
            "qwen2": lambda: tiny_causal_lm("qwen2", num_hidden_layers=4),
            "qwen3": lambda: tiny_causal_lm("qwen3", num_hidden_layers=4),
            "qwen3_moe": lambda: tiny_moe("qwen3_moe", num_hidden_layers=4),
            "mixtral": lambda: tiny_moe("mixtral", num_hidden_layers=4),
            "bert": tiny_bert}
RATIO = 0.25
WINDOWS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def _settings(method) -> list[tuple[str, ...]]:
    """The ``prune.units`` a method can be run with: its own default, then each unit type it scores alone."""
    entry = METHODS[method]
    return [tuple(entry.auto_units or entry.units)] + [(unit,) for unit in entry.units]


def _first_method(module, spec) -> tuple[str, tuple[str, ...]] | None:
    """The first registered method (and units) whose setting ``module`` claims on ``spec`` and that the checks
    made before loading accept."""
    for method in METHODS:
        for setting in _settings(method):
            if units.claiming(setting, spec) is not module:
                continue
            cfg = PruneParams(ratio=RATIO, units=list(setting), reconstruct="none")
            try:
                check_method(method, cfg)
                check_model(method, spec, cfg)
            except (ValueError, PruneflowError):
                continue
            return method, setting
    return None


CASES = [(module.NAME, family, *found) for module in units.modules() for family in FAMILIES
         if (found := _first_method(module, A.arch_for(family))) is not None]


def test_every_unit_module_is_in_the_suite():
    assert {name for name, *_ in CASES} == {module.NAME for module in units.modules()}


def _outputs(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("unit, family, method, setting", CASES, ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_a_unit_removes_what_its_plan_says_and_round_trips(unit, family, method, setting, tmp_path):
    spec = A.arch_for(family)
    model, dense = FAMILIES[family](), FAMILIES[family]()
    result = prune(model, spec, method, PruneParams(ratio=RATIO, units=list(setting), reconstruct="none"), WINDOWS)
    plan, module = result.plan, next(m for m in units.modules() if m.NAME == unit)

    holder = units.holding(plan)
    assert holder is module or (holder.NAME == "blocks" and not module.holds(plan))

    counts = A.count_parameters(model)
    assert counts["non_embedding"] == plan.params["non_embedding_after"] < plan.params["non_embedding_before"]
    assert counts["total"] == plan.params["total_after"]

    pruned = _outputs(model)
    apply(dense, PrunePlan.from_dict(json.loads(plan.to_json())), spec)
    assert torch.equal(_outputs(dense), pruned)

    checkpoint.save(model, None, tmp_path / "out", spec)
    loaded, _, _ = checkpoint.load(tmp_path / "out", with_tokenizer=False)
    torch.testing.assert_close(_outputs(loaded), pruned, rtol=0, atol=0)
