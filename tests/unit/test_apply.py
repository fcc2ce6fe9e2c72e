import pytest
import torch
from torch.testing import assert_close

from conftest import tiny_bert, tiny_causal_lm
from pruneflow.model import arch as A
from pruneflow.units.apply import apply, layer_shapes
from pruneflow.selection.plan import LayerPlan, PrunePlan
from pruneflow.selection.scores import Scores

PLAN_LAYERS = [  # 4 query heads in 2 KV groups (2 per group), 256 channels
    LayerPlan(kept_heads=[1, 3], kept_kv_heads=[0, 1], kept_channels=list(range(0, 256, 2))),
    LayerPlan(kept_heads=[2, 3], kept_kv_heads=[1], kept_channels=list(range(100))),
]


def make_plan(compensate=False):
    return PrunePlan(method="test", ratio=0.5, allocation="global", head_mode="query", units=["channels", "heads"],
                     round_to=1, reconstruct="bias" if compensate else "none", seed=0, layers=[LayerPlan(**vars(layer)) for layer in PLAN_LAYERS])


@torch.no_grad()
def zero_removed(model, spec, plan):
    """Zero the o_proj/down_proj input columns of everything the plan removes (and the removed KV heads' v)."""
    head_dim = A.geometry(model.config).head_dim
    for block, layer in zip(A.blocks(model, spec), plan.layers):
        o, down = A.get(block, spec.o).weight, A.get(block, spec.down).weight
        keep_cols = torch.zeros(o.shape[1], dtype=torch.bool)
        keep_cols[A.head_rows(layer.kept_heads, head_dim)] = True
        o[:, ~keep_cols] = 0
        keep_channels = torch.zeros(down.shape[1], dtype=torch.bool)
        keep_channels[layer.kept_channels] = True
        down[:, ~keep_channels] = 0


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_slicing_zeroed_units_leaves_logits_unchanged(kind):
    model = tiny_causal_lm(kind)
    spec = A.arch_for(model.config.model_type)
    plan = make_plan()
    zero_removed(model, spec, plan)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=ids).logits
    apply(model, plan, spec)
    assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    widths = A.layer_widths(model, spec)
    assert [(w["heads"], w["kv_heads"], w["channels"]) for w in widths] == [(2, 2, 128), (2, 1, 100)]


def test_slicing_bert_heads_and_channels_leaves_output_unchanged():
    model = tiny_bert()
    spec = A.arch_for("bert")
    plan = make_plan()
    plan.layers = [LayerPlan(kept_heads=[0, 2], kept_kv_heads=[0, 2], kept_channels=list(range(0, 128, 2))),
                   LayerPlan(kept_heads=[3], kept_kv_heads=[3], kept_channels=list(range(50)))]
    zero_removed(model, spec, plan)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=ids).last_hidden_state
    apply(model, plan, spec)
    assert_close(model(input_ids=ids).last_hidden_state, before, rtol=1e-5, atol=1e-5)


def test_flap_compensation_equals_the_removed_channels_mean_output():
    model = tiny_causal_lm("llama")
    spec = A.arch_for("llama")
    down = A.get(A.blocks(model, spec)[0], spec.down)
    captured = []
    handle = down.register_forward_pre_hook(lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    model(input_ids=torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2)))
    handle.remove()
    x = captured[0].double()  # (tokens, 256) down_proj inputs
    weight = down.weight.detach().double().clone()
    plan = make_plan(compensate=True)
    removed = [j for j in range(256) if j not in plan.layers[0].kept_channels]
    expected = (x[:, removed] @ weight[:, removed].T).mean(0)  # mean output of the removed channels
    means = Scores(heads=[], channels=[], attn_mean=[torch.zeros(64), torch.zeros(64)],
                   mlp_mean=[x.mean(0).float(), torch.zeros(256)])
    apply(model, plan, spec, means)
    new_down = A.get(A.blocks(model, spec)[0], spec.down)
    assert_close(new_down.bias.double(), expected, rtol=1e-5, atol=1e-6)


def test_layer_shapes_costs_match_real_parameter_counts():
    model = tiny_causal_lm("qwen2")  # q/k/v biases
    spec = A.arch_for("qwen2")
    shape = layer_shapes(model, spec)[0]
    block = A.blocks(model, spec)[0]
    q, k, v = (A.get(block, p) for p in (spec.q, spec.k, spec.v))
    assert shape.head_cost == (q.weight.numel() + q.bias.numel() + A.get(block, spec.o).weight.numel()) // 4
    assert shape.kv_cost == (k.weight.numel() + k.bias.numel() + v.weight.numel() + v.bias.numel()) // 2
    mlp = sum(A.get(block, p).weight.numel() for p in (spec.gate, spec.up, spec.down))
    assert shape.channel_cost == mlp // 256
