"""The GQA geometries of real models, scaled down: Qwen2.5-7B's 28 query / 4 KV heads (q/k/v biases) and
Llama-3-70B's 64 / 8 with a small head_dim. Weak units are planted (their weights scaled down by 1e-3: the q rows
and o_proj columns of a head, a KV group's k/v rows too, an MLP channel's gate/up rows and down column); every
sound method must remove exactly those first, in each head mode and allocation.

The models are random and calibrate on 32 × 64 tokens they sampled themselves: removing any unit that is not
planted then moves the model away from its own distribution, so the loss-based methods (Taylor, Bonsai) cannot
prefer it for lowering the loss. Weights are large enough (initializer_range 0.1, MLP output × 6) that one
head or channel changes the loss on 2k tokens by more than their sampling noise."""

import pytest
import torch

from conftest import tiny_causal_lm
from pruneflow.model import arch as A
from pruneflow.units.apply import layer_shapes
from pruneflow.methods import METHODS
from pruneflow.pipeline.params import BonsaiParams, PruneParams
from pruneflow.selection.plan import unit_cost
from pruneflow.prune import prune

GEOMETRIES = {  # name: (family, query heads, KV heads, head_dim, intermediate)
    "qwen2.5-7b": ("qwen2", 28, 4, 4, 96),
    "llama-3-70b": ("llama", 64, 8, 2, 96),
}
SOUND = sorted(m.name for m in METHODS.values() if m.widths and m.name != "random")
BONSAI = BonsaiParams(preset="fast", sub_models=64, n_windows=32, rows_per_forward=128, tolerance=0.002)
WEAK = 1e-3


def geometry_model(name: str):
    family, heads, kv_heads, head_dim, intermediate = GEOMETRIES[name]
    model = tiny_causal_lm(family, hidden_size=heads * head_dim, num_attention_heads=heads, initializer_range=0.1,
                           num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate)
    spec = A.arch_for(family)
    with torch.no_grad():
        for block in A.blocks(model, spec):
            A.get(block, spec.down).weight.mul_(6.0)
    return model


@torch.no_grad()
def own_text(model, n: int = 32, length: int = 64) -> torch.Tensor:
    """(n, length) tokens sampled from the model itself (temperature 1, no truncation), seeded."""
    torch.manual_seed(0)
    start = torch.randint(0, 256, (n, 1), generator=torch.Generator().manual_seed(1))
    return model.generate(start, max_new_tokens=length - 1, min_new_tokens=length - 1, do_sample=True, top_k=0,
                          top_p=1.0, pad_token_id=0)


@torch.no_grad()
def weaken_heads(model, spec, heads_by_layer: list[list[int]]) -> None:
    head_dim = A.geometry(model.config).head_dim
    for block, heads in zip(A.blocks(model, spec), heads_by_layer):
        rows = A.head_rows(heads, head_dim)
        A.get(block, spec.q).weight[rows] *= WEAK
        A.get(block, spec.o).weight[:, rows] *= WEAK


@torch.no_grad()
def weaken_groups(model, spec, group: int) -> list[int]:
    """KV group ``group`` of every layer: its KV head and all its query heads. Returns the query heads."""
    geo = A.geometry(model.config)
    heads = list(range(group * geo.group_size, (group + 1) * geo.group_size))
    weaken_heads(model, spec, [heads] * len(A.blocks(model, spec)))
    for block in A.blocks(model, spec):
        for path in (spec.k, spec.v):
            A.get(block, path).weight[A.head_rows([group], geo.head_dim)] *= WEAK
    return heads


@torch.no_grad()
def weaken_channels(model, spec, channels: list[int]) -> None:
    for block in A.blocks(model, spec):
        for path in (spec.gate, spec.up):
            A.get(block, path).weight[channels] *= WEAK
        A.get(block, spec.down).weight[:, channels] *= WEAK


def ratio_for(model, spec, kind: str, count: int = 1) -> float:
    """The ratio that removes ``count`` units of ``kind`` from every layer (heads or channels only)."""
    shapes = layer_shapes(model, spec)
    removed = sum(count * unit_cost(kind, s) for s in shapes)
    return removed / A.count_parameters(model)["non_embedding"]


def _prune(model, spec, method, ratio, units, allocation="auto", head_mode="auto"):
    # no compensation biases: ratio_for counts the planted units' parameters only (FLAP's bias would add some)
    cfg = PruneParams(ratio=ratio, units=units, allocation=allocation, head_mode=head_mode, reconstruct="none")
    windows = own_text(model)
    return prune(model, spec, method, cfg, windows, seed=0, options=BONSAI if method == "bonsai" else None).plan


def _allocations(method):
    return [a for a in ("uniform", "global") if a in METHODS[method].allocations]


def _fresh(geometry: str):
    """A new model of the geometry with its ArchSpec and head geometry (each allocation prunes its own)."""
    model = geometry_model(geometry)
    return model, A.arch_for(model.config.model_type), A.geometry(model.config)


@pytest.mark.parametrize("geometry", GEOMETRIES)
# minitron reads o_proj's inputs only (no weights): a head weakened in its q rows and o columns attends evenly
# but still outputs values of normal size, so it is not the weakest there (its KV group, weakened below, is)
@pytest.mark.parametrize("method", [m for m in SOUND if m != "minitron"])
def test_query_mode_removes_the_planted_head_of_every_kv_group_first(geometry, method):
    for allocation in _allocations(method):
        model, spec, geo = _fresh(geometry)
        planted = [g * geo.group_size + (g % geo.group_size) for g in range(geo.num_kv_heads)]
        weaken_heads(model, spec, [planted] * 2)
        plan = _prune(model, spec, method, ratio_for(model, spec, "query"), ["heads"], allocation, "query")
        for layer in plan.layers:
            assert sorted(set(range(geo.num_heads)) - set(layer.kept_heads)) == planted, (method, allocation)
            assert len(layer.kept_kv_heads) == geo.num_kv_heads


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("method", SOUND)
def test_group_mode_removes_the_planted_kv_group_first(geometry, method):
    for allocation in _allocations(method):
        model, spec, geo = _fresh(geometry)
        weak = geo.num_kv_heads - 2
        heads = weaken_groups(model, spec, weak)
        plan = _prune(model, spec, method, ratio_for(model, spec, "group"), ["heads"], allocation, "group")
        for layer in plan.layers:
            assert layer.kept_kv_heads == [g for g in range(geo.num_kv_heads) if g != weak], (method, allocation)
            assert not set(heads) & set(layer.kept_heads)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("method", SOUND)
def test_planted_weak_channels_go_first(geometry, method):
    for allocation in _allocations(method):
        model, spec, _ = _fresh(geometry)
        planted = list(range(3, 96, 8))  # 12 of 96
        weaken_channels(model, spec, planted)
        plan = _prune(model, spec, method, ratio_for(model, spec, "channel", len(planted)), ["channels"], allocation)
        for layer in plan.layers:
            assert sorted(set(range(96)) - set(layer.kept_channels)) == planted, (method, allocation)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_bonsai_query_mode_removes_heads_weak_in_only_one_kv_group(geometry):
    """Candidates for one query step must exist in every KV group: with the weakest heads all in one group, a
    layer-wide candidate pool leaves the other groups' steps at +inf and no head could ever be removed."""
    model, spec, geo = _fresh(geometry)
    weak = [0, 1]  # two heads of KV group 0, in every layer
    weaken_heads(model, spec, [weak] * 2)
    plan = _prune(model, spec, "bonsai", ratio_for(model, spec, "query"), ["heads"], head_mode="query")
    for layer in plan.layers:
        removed = set(range(geo.num_heads)) - set(layer.kept_heads)
        assert len(removed) == geo.num_kv_heads and len(layer.kept_kv_heads) == geo.num_kv_heads
        assert removed & set(weak), removed  # group 0 gave up one of its weak heads


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("method", ["random", "block_influence", "angular", "sleb"])
def test_the_other_methods_run_on_the_geometry(geometry, method):
    model = geometry_model(geometry)
    spec = A.arch_for(model.config.model_type)
    result = prune(model, spec, method, PruneParams(ratio=0.3), own_text(model))
    assert result.plan.params["non_embedding_after"] == A.count_parameters(model)["non_embedding"]
