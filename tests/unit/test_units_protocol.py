"""Every unit module of the registry speaks the whole protocol, and the registry routes each unit setting to the
module that owns it (and block widths to none) on every family."""

import pytest

from pruneflow.model import arch as A
from pruneflow import units
from pruneflow.pipeline.params import PruneParams
from pruneflow.selection.plan import PrunePlan

PROTOCOL = ("claims", "check_settings", "check_model", "select", "holds", "apply_plan")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "bert")
# prune.units → the module that owns it, per kind of architecture (dense, MoE)
OWNER = {("heads",): ("blocks", "blocks"), ("channels",): ("blocks", "expert_channels"),
         ("layers",): ("blocks", "blocks"), ("heads", "channels"): ("blocks", "expert_channels"),
         ("heads", "channels", "layers"): ("blocks", "expert_channels"), ("hidden",): ("hidden", "hidden"),
         ("experts",): ("experts", "experts"), ("subblocks",): ("subblocks", "subblocks"),
         ("merged_layers",): ("merged_layers", "merged_layers")}


@pytest.mark.parametrize("module", units.modules(), ids=lambda m: m.NAME)
def test_every_unit_module_has_the_whole_protocol(module):
    assert all(callable(getattr(module, name, None)) for name in PROTOCOL)
    # expert_channels: the channels unit of MoE models; blocks: heads, channels and layers (block widths)
    assert module.NAME in units.UNIT_TYPES or module.NAME in ("expert_channels", "blocks")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("setting", list(OWNER), ids=",".join)
def test_the_registry_routes_each_unit_setting_to_its_owner(family, setting):
    spec = A.arch_for(family)
    owner = units.claiming(setting, spec)
    assert owner.NAME == OWNER[setting][spec.moe]


def test_a_mix_no_unit_takes_is_a_clear_error():
    from pruneflow.errors import PruneflowError

    with pytest.raises(PruneflowError, match="no unit type prunes tokens"):
        units.claiming(("tokens",), A.arch_for("llama"))


def test_a_plan_is_held_by_the_unit_that_wrote_it_and_old_plans_are_block_widths():
    base = dict(method="m", ratio=0.3, allocation="global", head_mode="auto", units=["heads"], round_to=1,
                reconstruct="none", seed=0, layers=[])
    assert units.holding(PrunePlan(**base)).NAME == "blocks"
    assert units.holding(PrunePlan(**base, kept={"hidden": [0, 1]})).NAME == "hidden"
    assert units.holding(PrunePlan(**base, kept={"experts": [[0]]})).NAME == "experts"
    assert units.holding(PrunePlan(**base, kept={"expert_channels": [[[0]]]})).NAME == "expert_channels"
    assert units.holding(PrunePlan(**base, kept={"merged_layers": {"merges": []}})).NAME == "merged_layers"
    old = PrunePlan.from_dict({k: v for k, v in base.items()})  # a plan.json written before plan.kept
    assert old.kept == {} and units.holding(old).NAME == "blocks"


def test_a_plan_keeps_one_mapping_per_unit_type_and_reads_the_fields_it_had_before():
    """plan.json: ``kept`` holds what every unit keeps beyond block widths; plans written with a field per unit
    (kept_layers, kept_hidden, kept_experts, kept_expert_channels; None: all kept) read into it."""
    import json

    base = dict(method="m", ratio=0.3, allocation="global", head_mode="auto", units=["layers"], round_to=1,
                reconstruct="none", seed=0, layers=[])
    old = PrunePlan.from_dict({**base, "kept_layers": [0, 2], "kept_hidden": None, "kept_experts": [[1, 3]],
                               "kept_expert_channels": None, "kept": {}})
    assert old.kept == {"layers": [0, 2], "experts": [[1, 3]]}
    assert (old.kept_layers, old.kept_experts, old.kept_hidden) == ([0, 2], [[1, 3]], None)
    written = json.loads(old.to_json())
    assert written["kept"] == {"layers": [0, 2], "experts": [[1, 3]]}
    assert not any(key.startswith("kept_") for key in written)
    assert PrunePlan.from_dict(written) == old


@pytest.mark.parametrize("family", FAMILIES)
def test_settings_of_other_units_are_not_refused_by_a_unit_that_does_not_own_them(family):
    spec = A.arch_for(family)
    cfg = PruneParams(ratio=0.3, units=["heads", "channels"]).for_method("magnitude")
    for module in units.modules():
        if not spec.moe:  # on MoE models the experts module refuses heads by design
            module.check_settings(spec, cfg, "magnitude")
