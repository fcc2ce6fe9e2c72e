"""Every method × units × allocation × reconstruct × objective on every family: refused from the config before
any model is loaded (a ``PruneflowError``, or the params check's ``ValueError`` the CLI turns into one), or run.

A run may still refuse with a ``PruneflowError`` what only the loaded model shows (``check_units``: e.g. a
ratio no whole number of hidden channels gives), before any forward pass; nothing may raise anything else."""

import itertools

import pytest
import torch

from conftest import tiny_bert, tiny_causal_lm, tiny_moe
from pruneflow.errors import PruneflowError
from pruneflow.execution.runtime import Runtime
from pruneflow.methods import METHODS
from pruneflow.model import arch as A
from pruneflow.pipeline.params import BonsaiParams, PruneParams, check_method
from pruneflow.execution.objectives import resolve
from pruneflow.prune import check_model, prune, uses_objective
from pruneflow.units import ALLOCATIONS, RECONSTRUCTIONS

FAMILIES = {"llama": lambda: tiny_causal_lm("llama", num_hidden_layers=3),
            "qwen2": lambda: tiny_causal_lm("qwen2", num_hidden_layers=3),
            "qwen3": lambda: tiny_causal_lm("qwen3", num_hidden_layers=3),
            "qwen3_moe": lambda: tiny_moe("qwen3_moe", num_hidden_layers=3),
            "bert": tiny_bert}
UNITS = ("auto", ["heads"], ["channels"], ["heads", "channels"], ["layers"], ["heads", "channels", "layers"],
         ["hidden"], ["experts"], ["subblocks"], ["merged_layers"])
OBJECTIVES = ("auto", "loss", "kl", "hidden")
WINDOWS = torch.randint(0, 256, (6, 48), generator=torch.Generator().manual_seed(0))  # 288 tokens ≥ lstsq's 256 columns
# one Bonsai iteration per run (prune_frac ≥ the ratio's remainder after tolerance)
OPTIONS = {"bonsai": BonsaiParams(preset="fast", prune_frac=0.3, sub_models=4, n_windows=2, rows_per_forward=8,
                                  tolerance=0.1)}
SEARCH = {"budget": 2, "offspring": 1, "windows": 2}


def _refused(method: str, cfg: PruneParams, spec, objective: str) -> bool:
    """Whether the checks that run before any model is loaded refuse it (with nothing but the two errors)."""
    try:
        check_method(method, cfg)
        check_model(method, spec, cfg, objective)
    except (ValueError, PruneflowError):
        return True
    return False


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_combination_is_refused_up_front_or_runs(family, method):
    spec = A.arch_for(family)
    ran, late = set(), []
    for units, allocation, reconstruct, objective in itertools.product(UNITS, ("auto", *ALLOCATIONS),
                                                                       ("auto", *RECONSTRUCTIONS), OBJECTIVES):
        cfg = PruneParams(ratio=0.3, units=units, allocation=allocation, reconstruct=reconstruct, search=SEARCH)
        if _refused(method, cfg, spec, objective):
            continue
        resolved = cfg.for_method(method)  # an ``auto`` that resolves to a configuration already run is the same run
        key = (tuple(resolved.units), resolved.allocation, resolved.reconstruct,
               resolve(objective, spec.causal_lm) if uses_objective(method, cfg) else None)
        if key in ran:
            continue
        ran.add(key)
        model = FAMILIES[family]()
        try:
            prune(model, spec, method, cfg, WINDOWS, runtime=Runtime(), options=OPTIONS.get(method),
                  objective=objective)
        except PruneflowError as err:  # what only the model shows, said before any forward pass
            late.append(f"{units} {allocation} {reconstruct} {objective}: {err}")
    # each late refusal is a model-level one: the ratio against this tiny model's granularity
    assert all("ratio" in message for message in late), late
