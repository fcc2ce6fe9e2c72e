"""Depth pruning: whole blocks removed, layer_idx renumbered, checkpoints stay vanilla."""

import json

import pytest
import torch
from torch.testing import assert_close

from conftest import tiny_causal_lm
from pruneflow.model import arch as A
from pruneflow.model import checkpoint
from pruneflow.errors import PruneflowError
from pruneflow.methods import block_influence
from pruneflow.pipeline.params import PruneParams
from pruneflow.prune import prune
from pruneflow.execution.runtime import Runtime

WINDOWS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def with_identity_blocks(kind="llama", layers=4, identity=(1,)):
    """A tiny model whose listed blocks add nothing to the residual stream (zero o_proj and down_proj)."""
    model = tiny_causal_lm(kind, num_hidden_layers=layers)
    spec = A.arch_for(model.config.model_type)
    with torch.no_grad():
        for index in identity:
            block = A.blocks(model, spec)[index]
            A.get(block, spec.o).weight.zero_()
            A.get(block, spec.down).weight.zero_()
    return model, spec


def test_block_influence_of_an_identity_block_is_zero():
    model, spec = with_identity_blocks()
    scores = block_influence.score(model, spec, WINDOWS, Runtime())
    assert scores.layers[1].item() == pytest.approx(0.0, abs=1e-9)
    assert (scores.layers[[0, 2, 3]] > 1e-4).all()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_removing_an_identity_block_keeps_logits_and_loads_vanilla(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    model, spec = with_identity_blocks(kind)
    dense_logits = model(input_ids=IDS).logits
    dense_generated = model.generate(IDS[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)
    one_block = 0.2  # of 4 blocks: the single closest count is one
    result = prune(model, spec, "block_influence", PruneParams(ratio=one_block, units=["layers"]), WINDOWS)
    assert result.plan.kept_layers == [0, 2, 3]
    assert model.config.num_hidden_layers == 3
    assert [b.self_attn.layer_idx for b in A.blocks(model, spec)] == [0, 1, 2]
    assert_close(model(input_ids=IDS).logits, dense_logits, rtol=1e-5, atol=1e-5)
    info = checkpoint.save(model, None, tmp_path / "out", spec)
    assert info["vanilla"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    if "layer_types" in config:
        assert len(config["layer_types"]) == 3
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(plain(input_ids=IDS).logits, model(input_ids=IDS).logits)
    generated = plain.generate(IDS[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)  # KV cache slots
    assert torch.equal(generated, dense_generated)


def test_angular_removes_the_closest_contiguous_run():
    model, spec = with_identity_blocks(layers=5, identity=(2, 3))
    result = prune(model, spec, "angular", PruneParams(ratio=0.35, units=["layers"]), WINDOWS)
    assert result.plan.kept_layers == [0, 1, 4]
    assert result.scores.extra["block_size"] == 2 and result.scores.extra["start"] == 2


def test_depth_ratio_accounting_is_exact_and_removes_the_nearest_whole_number_of_blocks():
    """Counted here from the blocks' own tensors: the parameters removed are exactly the removed blocks', the
    recorded ratio is theirs over the non-embedding total, and their number is the whole number of (equal)
    blocks nearest the ratio asked for."""
    model, spec = with_identity_blocks()
    blocks = [sum(p.numel() for p in block.parameters()) for block in A.blocks(model, spec)]
    before = A.count_parameters(model)["non_embedding"]
    result = prune(model, spec, "block_influence", PruneParams(ratio=0.4, units=["layers"]), WINDOWS)
    removed = [i for i in range(len(blocks)) if i not in result.plan.kept_layers]  # 0.4 is 1.6 blocks: 2
    assert before - A.count_parameters(model)["non_embedding"] == sum(blocks[i] for i in removed)
    assert result.plan.params["achieved_ratio"] == pytest.approx(sum(blocks[i] for i in removed) / before)
    assert len(set(blocks)) == 1 and len(removed) == round(0.4 * before / blocks[0]) == 2


@pytest.mark.parametrize("method,units,message", [
    ("wanda_sp", ["layers"], "method wanda_sp scores heads, channels, not layers; depth methods"),
    ("block_influence", ["channels"], "method block_influence scores layers, subblocks, not channels"),
    ("block_influence", ["layers", "heads"], "method block_influence scores layers, subblocks, not heads"),
])
def test_mismatched_method_and_units_are_refused(method, units, message):
    model, spec = with_identity_blocks()
    with pytest.raises(PruneflowError, match=message):
        prune(model, spec, method, PruneParams(ratio=0.3, units=units), WINDOWS)


def _loss_without(model, spec, removed: set[int]) -> float:
    """Mean next-token loss on WINDOWS of a copy of ``model`` with the blocks ``removed`` deleted."""
    import copy
    import math

    from pruneflow.units.apply import remove_layers
    from pruneflow.evaluation.evaluate import perplexity

    smaller = copy.deepcopy(model)
    remove_layers(smaller, spec, [i for i in range(len(A.blocks(model, spec))) if i not in removed])
    return math.log(perplexity(smaller, WINDOWS.reshape(-1), WINDOWS.shape[1]))


def test_sleb_is_greedy_on_calibration_loss_and_skipping_equals_removal():
    model, spec = with_identity_blocks(layers=4, identity=(1,))
    dense_loss = _loss_without(model, spec, set())
    single = [_loss_without(model, spec, {i}) for i in range(4)]
    assert single[1] == pytest.approx(dense_loss, abs=1e-6)  # removing the identity block changes nothing
    result = prune(model, spec, "sleb", PruneParams(ratio=0.4, units=["layers"]), WINDOWS)
    order, losses = result.scores.extra["removal_order"], result.scores.extra["calibration_loss"]
    assert len(order) == 2 and order[0] == min(range(4), key=lambda i: (single[i], i))
    assert losses[0] == pytest.approx(min(single), abs=1e-6) and losses[0] <= dense_loss + 1e-6
    assert result.plan.kept_layers == sorted(set(range(4)) - set(order))
    assert _loss_without(model, spec, set()) == pytest.approx(losses[-1], abs=1e-5)  # skipped == removed
