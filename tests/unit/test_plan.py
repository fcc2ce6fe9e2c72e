import json
import math

import pytest
import torch

from pruneflow.errors import PruneflowError
from pruneflow.selection.plan import LayerShape, PrunePlan, SelectConfig, removed_parameters, select
from pruneflow.selection.scores import Scores

HIDDEN, HEAD_DIM = 64, 16


def shapes(layers=3, heads=8, kv=4, channels=200, q_bias=0):
    return [LayerShape(heads=heads, kv_heads=kv, channels=channels, hidden=HIDDEN,
                       head_cost=HEAD_DIM * (2 * HIDDEN + q_bias), kv_cost=2 * HEAD_DIM * (HIDDEN + q_bias),
                       channel_cost=3 * HIDDEN, o_bias=False, down_bias=False) for _ in range(layers)]


def counts(layer_shapes):
    per_layer = [s.heads * s.head_cost + s.kv_heads * s.kv_cost + s.channels * s.channel_cost + 2 * HIDDEN
                 for s in layer_shapes]  # + two norms
    non_embedding = sum(per_layer)
    return {"total": non_embedding + 1000, "non_embedding": non_embedding}


def scores(layer_shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Scores(heads=[torch.rand(s.heads, generator=gen) for s in layer_shapes],
                  channels=[torch.rand(s.channels, generator=gen) for s in layer_shapes])


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("head_mode", ["query", "group"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_selection_hits_the_ratio_exactly_up_to_one_channel(allocation, head_mode, ratio):
    layer_shapes = shapes()
    params = counts(layer_shapes)
    plan = select(scores(layer_shapes), layer_shapes, params,
                  SelectConfig(ratio=ratio, allocation=allocation, head_mode=head_mode))
    channel_fraction = 3 * HIDDEN / params["non_embedding"]
    assert abs(plan.params["achieved_ratio"] - ratio) <= len(layer_shapes) * channel_fraction
    kept = sum(len(k.kept_heads) * s.head_cost + len(k.kept_kv_heads) * s.kv_cost + len(k.kept_channels) *
               s.channel_cost + 2 * HIDDEN for k, s in zip(plan.layers, layer_shapes))  # what each layer keeps
    assert plan.params["non_embedding_after"] == kept


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_query_mode_keeps_equal_group_sizes(allocation):
    layer_shapes = shapes()
    plan = select(scores(layer_shapes), layer_shapes, counts(layer_shapes),
                  SelectConfig(ratio=0.5, allocation=allocation, head_mode="query"))
    for layer in plan.layers:
        groups = [h // 2 for h in layer.kept_heads]
        assert layer.kept_kv_heads == list(range(4))  # query mode never drops a KV head
        assert len({groups.count(g) for g in layer.kept_kv_heads}) == 1


def test_group_mode_removes_whole_groups_with_their_query_heads():
    layer_shapes = shapes()
    plan = select(scores(layer_shapes), layer_shapes, counts(layer_shapes),
                  SelectConfig(ratio=0.5, allocation="uniform", head_mode="group"))
    for layer in plan.layers:
        assert len(layer.kept_kv_heads) == 2  # round(0.5 · 4)
        assert sorted({h // 2 for h in layer.kept_heads}) == layer.kept_kv_heads
        assert len(layer.kept_heads) == 2 * len(layer.kept_kv_heads)


def test_selection_removes_the_lowest_scored_channels():
    layer_shapes = shapes(layers=1)
    s = scores(layer_shapes)
    plan = select(s, layer_shapes, counts(layer_shapes), SelectConfig(ratio=0.3, units=("channels",), allocation="uniform"))
    kept = set(plan.layers[0].kept_channels)
    removed = [j for j in range(200) if j not in kept]
    assert max(s.channels[0][removed]) < min(s.channels[0][list(kept)])


def test_global_allocation_follows_scores_across_layers():
    layer_shapes = shapes(layers=2)
    s = scores(layer_shapes)
    s.channels[1] += 10.0  # layer 1's channels all matter more
    s.comparable = True
    plan = select(s, layer_shapes, counts(layer_shapes), SelectConfig(ratio=0.3, units=("channels",)))
    assert len(plan.layers[1].kept_channels) == 200
    assert len(plan.layers[0].kept_channels) < 200


def test_global_allocation_never_empties_a_module():
    layer_shapes = shapes(layers=2)
    s = scores(layer_shapes)
    s.channels[0] -= 100.0
    s.comparable = True
    plan = select(s, layer_shapes, counts(layer_shapes), SelectConfig(ratio=0.6, units=("channels",)))
    assert len(plan.layers[0].kept_channels) == 1


def test_uniform_refuses_to_empty_a_layers_attention():
    layer_shapes = shapes(layers=2)
    with pytest.raises(PruneflowError, match="would remove all attention heads of layer 0"):
        select(scores(layer_shapes), layer_shapes, counts(layer_shapes),
               SelectConfig(ratio=0.5, allocation="uniform", units=("heads",), head_mode="group"))


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_round_to_keeps_multiples(allocation):
    layer_shapes = shapes()
    plan = select(scores(layer_shapes), layer_shapes, counts(layer_shapes),
                  SelectConfig(ratio=0.3, allocation=allocation, round_to=16))
    assert all(len(layer.kept_channels) % 16 == 0 for layer in plan.layers)


@pytest.mark.parametrize("channels,removed,kept", [(688, 0, 688), (688, 5, 688), (688, 10, 672), (700, 5, 700),
                                                   (700, 30, 672), (200, 150, 64), (200, 199, 32)])
def test_round_to_never_keeps_more_channels_than_the_layer_has(channels, removed, kept):
    """A width that is not a multiple (688 = 21.5 × 32) rounds to the nearest multiple below it or stays whole;
    rounding up past it once wrapped around and removed all but 16 channels of a barely pruned layer."""
    from pruneflow.selection.plan import _round_channels

    shape = shapes(layers=1, channels=channels)[0]
    values = torch.arange(channels, dtype=torch.float32)
    gone = _round_channels(list(range(removed)), values, shape, 32, 0)
    assert channels - len(gone) == kept and gone == list(range(channels - kept))  # the lowest scores go


def test_round_to_larger_than_a_layer_is_an_error():
    layer_shapes = shapes()
    with pytest.raises(PruneflowError, match="round_to=256 is larger than layer 0's MLP width"):
        select(scores(layer_shapes), layer_shapes, counts(layer_shapes), SelectConfig(ratio=0.3, round_to=256))


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_ratio_outside_open_interval_is_refused(ratio):
    layer_shapes = shapes()
    with pytest.raises(PruneflowError, match=r"prune.ratio: must be in \(0, 1\)"):
        select(scores(layer_shapes), layer_shapes, counts(layer_shapes), SelectConfig(ratio=ratio))


def test_compensation_biases_are_counted():
    layer_shapes = shapes()
    params = counts(layer_shapes)
    plan = select(scores(layer_shapes), layer_shapes, params, SelectConfig(ratio=0.3, reconstruct="bias"))
    s = layer_shapes[0]
    expected = 0
    for layer in plan.layers:
        lost_heads, lost_channels = s.heads - len(layer.kept_heads), s.channels - len(layer.kept_channels)
        expected += lost_heads * s.head_cost + lost_channels * s.channel_cost
        expected += (s.kv_heads - len(layer.kept_kv_heads)) * s.kv_cost
        expected -= HIDDEN * ((lost_heads > 0) + (lost_channels > 0))  # the o / down biases it adds
    assert removed_parameters(plan, layer_shapes) == expected
    assert abs(plan.params["achieved_ratio"] - 0.3) <= 3 * s.channel_cost / params["non_embedding"]


@pytest.mark.parametrize("heads,kv,expected", [(8, 4, "group"), (16, 2, "query"), (4, 4, "group")])
def test_auto_head_mode_picks_the_finer_unit(heads, kv, expected):
    """8 heads / 4 KV: a group is 2 heads + 1 KV head, finer than 4 heads (one per group); 16/2 the reverse."""
    layer_shapes = shapes(heads=heads, kv=kv)
    plan = select(scores(layer_shapes), layer_shapes, counts(layer_shapes),
                  SelectConfig(ratio=0.4, allocation="uniform", head_mode="auto"))
    layer = plan.layers[0]
    if expected == "group":
        assert len(layer.kept_kv_heads) < kv and len(layer.kept_heads) == len(layer.kept_kv_heads) * heads // kv
    else:
        assert len(layer.kept_kv_heads) == kv and len(layer.kept_heads) < heads


def test_plan_round_trips_through_json():
    layer_shapes = shapes()
    plan = select(scores(layer_shapes), layer_shapes, counts(layer_shapes), SelectConfig(ratio=0.3))
    again = PrunePlan.from_dict(json.loads(plan.to_json()))
    assert again == plan


def test_width_and_depth_combine_in_one_plan_with_exact_accounting():
    layer_shapes = [LayerShape(**{**vars(s), "fixed_cost": 2 * HIDDEN}) for s in shapes(layers=4)]
    s = scores(layer_shapes)
    s.comparable = True
    s.layers = torch.tensor([0.9, -5.0, 0.8, 0.7])  # block 1 is by far the least important
    params = counts(layer_shapes)
    plan = select(s, layer_shapes, params, SelectConfig(ratio=0.4, units=("layers", "channels", "heads")))
    assert plan.kept_layers == [0, 2, 3]
    assert any(len(plan.layers[i].kept_channels) < 200 for i in plan.kept_layers)
    removed = layer_shapes[1].block_cost + sum(
        (200 - len(plan.layers[i].kept_channels)) * 3 * HIDDEN + (8 - len(plan.layers[i].kept_heads)) * 2048
        + (4 - len(plan.layers[i].kept_kv_heads)) * 2048 for i in plan.kept_layers)
    assert removed_parameters(plan, layer_shapes) == removed
    assert abs(plan.params["achieved_ratio"] - 0.4) <= 3 * HIDDEN / params["non_embedding"]


def test_width_units_taken_before_their_block_is_removed_are_not_counted_twice():
    layer_shapes = [LayerShape(**{**vars(s), "fixed_cost": 2 * HIDDEN}) for s in shapes(layers=4)]
    s = scores(layer_shapes)
    s.comparable = True
    s.channels[1] -= 100.0  # block 1's channels go first ...
    s.layers = torch.tensor([0.9, -5.0, 0.8, 0.7])  # ... and then block 1 itself
    params = counts(layer_shapes)
    plan = select(s, layer_shapes, params, SelectConfig(ratio=0.4, units=("layers", "channels", "heads")))
    assert plan.kept_layers == [0, 2, 3]
    assert abs(plan.params["achieved_ratio"] - 0.4) <= 3 * HIDDEN / params["non_embedding"]
