import torch

from conftest import tiny_causal_lm
from pruneflow.model import arch as A
from pruneflow.units.apply import apply
from pruneflow.units.masking import unit_masks
from pruneflow.selection.plan import LayerPlan, PrunePlan

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def test_all_ones_masks_equal_the_dense_forward_exactly():
    model = tiny_causal_lm("llama")
    spec = A.arch_for("llama")
    dense = model(input_ids=IDS).logits
    with unit_masks(model, spec, [torch.ones(2, 4)] * 2, [torch.ones(2, 256)] * 2):
        masked = model(input_ids=IDS).logits
    assert torch.equal(masked, dense)
    assert torch.equal(model(input_ids=IDS).logits, dense)  # hooks are gone afterwards


def test_masking_units_equals_slicing_them_out_row_by_row():
    model = tiny_causal_lm("llama")
    spec = A.arch_for("llama")
    kept = [LayerPlan(kept_heads=[0, 1, 3], kept_kv_heads=[0, 1], kept_channels=list(range(0, 256, 3))),
            LayerPlan(kept_heads=[0, 1, 2, 3], kept_kv_heads=[0, 1], kept_channels=list(range(200)))]
    head_masks = [torch.zeros(2, 4), torch.zeros(2, 4)]
    channel_masks = [torch.zeros(2, 256), torch.zeros(2, 256)]
    for layer, plan in enumerate(kept):
        head_masks[layer][0, plan.kept_heads] = 1
        channel_masks[layer][0, plan.kept_channels] = 1
        head_masks[layer][1] = 1  # row 1 stays dense
        channel_masks[layer][1] = 1
    dense = model(input_ids=IDS).logits
    with unit_masks(model, spec, head_masks, channel_masks):
        masked = model(input_ids=IDS).logits
    torch.testing.assert_close(masked[1], dense[1], rtol=0, atol=0)
    # Slicing needs equal group sizes, so compare against the slice of a plan that masks a whole query head:
    # head 2 sits in group 1 with head 3; zeroing it is equivalent to removing only its o_proj columns.
    plan = PrunePlan(method="m", ratio=0.1, allocation="global", head_mode="query", units=["channels", "heads"],
                     round_to=1, reconstruct="none", seed=0,
                     layers=[LayerPlan(kept_heads=[0, 1, 2, 3], kept_kv_heads=[0, 1],
                                       kept_channels=kept[0].kept_channels),
                             LayerPlan(kept_heads=[0, 1, 2, 3], kept_kv_heads=[0, 1],
                                       kept_channels=kept[1].kept_channels)])
    with torch.no_grad():
        o = A.get(A.blocks(model, spec)[0], spec.o).weight
        head_dim = A.geometry(model.config).head_dim
        o[:, 2 * head_dim:3 * head_dim] = 0  # head 2 of layer 0, masked in row 0
    apply(model, plan, spec)
    torch.testing.assert_close(model(input_ids=IDS).logits[0], masked[0], rtol=1e-5, atol=1e-5)
