"""The sub-block unit (a block's whole attention or MLP) and BlockPruner: masked candidates are the sliced model,
a dead sub-block costs nothing, the pruned model saves, loads and generates with its KV cache, and what the unit
cannot do is refused before any forward pass."""

import pytest
import torch
from torch.testing import assert_close

from conftest import per_layer_round_trip, tiny_bert, tiny_causal_lm, tiny_moe
from pruneflow.model import arch as A
from pruneflow.units.apply import apply, layer_shapes
from pruneflow.errors import PruneflowError
from pruneflow.execution import passes
from pruneflow.execution.losses import token_nll
from pruneflow.methods import blockpruner
from pruneflow.pipeline.params import PruneParams
from pruneflow.selection.plan import PrunePlan
from pruneflow.prune import prune
from pruneflow.execution.runtime import Runtime
from pruneflow.selection.scores import Scores
from pruneflow.units import subblocks

WINDOWS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def mean_loss(model, windows=WINDOWS) -> float:
    with torch.no_grad():
        return token_nll(model, windows).double().mean().item()


def plan_removing(shapes, removed) -> PrunePlan:
    return PrunePlan(method="test", ratio=0.3, allocation="global", head_mode="auto", units=["subblocks"],
                     round_to=1, reconstruct="none", seed=0, layers=subblocks.removal_plan(shapes, removed))


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_a_masked_candidate_has_the_loss_of_the_sliced_model(kind):
    model = tiny_causal_lm(kind, num_hidden_layers=3)
    spec = A.arch_for(model.config.model_type)
    shapes = layer_shapes(model, spec)
    removed = [(0, 0), (1, 1), (2, 0), (2, 1)]
    masked = passes.losses(model, spec, WINDOWS, blockpruner.candidates(shapes, removed[:-1], [removed[-1]]),
                           Runtime())
    apply(model, plan_removing(shapes, removed), spec)
    assert [A.get(b, spec.q).out_features for b in A.blocks(model, spec)] == [0, 64, 0] or kind == "qwen3"
    assert masked.item() == pytest.approx(mean_loss(model), abs=1e-5)


def test_a_dead_mlp_costs_nothing_and_blockpruner_scores_it_with_the_dense_loss():
    model = tiny_causal_lm("llama", num_hidden_layers=3)
    spec = A.arch_for(model.config.model_type)
    with torch.no_grad():
        A.get(A.blocks(model, spec)[1], spec.down).weight.zero_()
    shapes = layer_shapes(model, spec)
    trials = [(i, k) for i in range(3) for k in (0, 1)]
    losses = passes.losses(model, spec, WINDOWS, blockpruner.candidates(shapes, [], trials), Runtime())
    assert losses[trials.index((1, 1))].item() == pytest.approx(mean_loss(model), abs=1e-6)
    others = [loss for trial, loss in zip(trials, losses.tolist()) if trial != (1, 1)]
    assert all(abs(loss - mean_loss(model)) > 1e-4 for loss in others)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_blockpruner_prunes_to_the_ratio_and_the_model_round_trips_and_generates(kind, tmp_path):
    model = tiny_causal_lm(kind, num_hidden_layers=4)
    spec = A.arch_for(model.config.model_type)
    result = prune(model, spec, "blockpruner", PruneParams(ratio=0.3), WINDOWS)
    plan = result.plan
    assert plan.units == ["subblocks"] and plan.allocation == "global"
    order = result.scores.extra["removal_order"]
    widths = [(len(layer.kept_heads), len(layer.kept_channels)) for layer in plan.layers]
    gone = sorted((i, k) for i, (heads, channels) in enumerate(widths) for k, w in enumerate((heads, channels))
                  if w == 0)
    assert gone == sorted((int(name.split()[1]), subblocks.KINDS.index(name.split()[0])) for name in order[:len(gone)])
    shapes_cost = sum(subblocks.costs(s)[k] for s, (i, k) in
                      zip([layer_shapes(tiny_causal_lm(kind, num_hidden_layers=4), spec)[i] for i, _ in gone], gone))
    assert plan.params["non_embedding_before"] - plan.params["non_embedding_after"] == shapes_cost
    assert abs(plan.params["achieved_ratio"] - 0.3) < 0.15  # a sub-block is an eighth of this model
    loaded = per_layer_round_trip(model, spec, tmp_path / "out", IDS)
    with torch.no_grad():  # the KV cache of a removed attention still counts positions
        cached = loaded.generate(IDS[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        uncached = loaded.generate(IDS[:1], max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_an_attention_removed_from_block_0_keeps_cached_generation_exact():
    model = tiny_causal_lm("llama", num_hidden_layers=2)
    spec = A.arch_for(model.config.model_type)
    apply(model, plan_removing(layer_shapes(model, spec), [(0, 0)]), spec)
    with torch.no_grad():
        cached = model.generate(IDS[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)
        uncached = model.generate(IDS[:1], max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_selection_takes_the_removal_order_until_closest_to_the_target():
    model = tiny_causal_lm("llama", num_hidden_layers=4)
    spec = A.arch_for(model.config.model_type)
    shapes, non_embedding = layer_shapes(model, spec), A.count_parameters(model)["non_embedding"]
    attention, mlp = subblocks.costs(shapes[0])
    order = [(3, 1), (0, 0), (2, 1), (1, 0)]
    scores = Scores(heads=[], channels=[], comparable=True, extra={"subblocks": subblocks.ranks(order, 4)})
    ratio = (mlp + attention + mlp / 4) / non_embedding  # a quarter of the next MLP: closer without it
    plan = subblocks.select(model, spec, scores, PruneParams(ratio=ratio).for_method("blockpruner"), "blockpruner")
    kept = [(len(layer.kept_heads), len(layer.kept_channels)) for layer in plan.layers]
    assert kept == [(0, 256), (4, 256), (4, 256), (4, 0)]
    assert plan.params["non_embedding_after"] == non_embedding - attention - mlp


@pytest.mark.parametrize("model, settings, message", [
    ("llama", {"units": ["subblocks", "heads"]}, "scores subblocks, not heads; use units: \\[subblocks\\]"),
    ("llama", {"units": ["subblocks"], "allocation": "uniform"}, "global"),
    ("llama", {"units": ["subblocks"], "reconstruct": "lstsq"}, "reconstruct: none"),
    ("bert", {"units": ["subblocks"]}, "encoder"),
    ("moe", {"units": ["subblocks"]}, "Mixture.of.Experts"),
])
def test_what_the_unit_cannot_do_is_refused_before_any_forward_pass(model, settings, message, monkeypatch):
    model = {"llama": lambda: tiny_causal_lm("llama"), "bert": tiny_bert, "moe": tiny_moe}[model]()
    spec = A.arch_for(model.config.model_type)

    def no_forward(*_, **__):
        raise AssertionError("a forward pass ran before the refusal")

    monkeypatch.setattr(passes, "losses", no_forward)
    with pytest.raises(PruneflowError, match=message):
        prune(model, spec, "blockpruner", PruneParams(ratio=0.3, **settings), WINDOWS)


def test_a_width_method_cannot_score_subblocks():
    model = tiny_causal_lm("llama")
    with pytest.raises(PruneflowError, match="scores heads, channels, not subblocks"):
        prune(model, A.arch_for("llama"), "magnitude", PruneParams(ratio=0.3, units=["subblocks"]), WINDOWS)


def test_the_score_stage_keeps_the_sub_block_scores(tmp_path):
    from pruneflow.pipeline.stages import load_scores, save_scores

    ranked = subblocks.ranks([(1, 0), (0, 1)], 2)
    save_scores(Scores(heads=[], channels=[], comparable=True, extra={"subblocks": ranked, "note": "x"}), tmp_path)
    (tmp_path / "scores.json").write_text('{"comparable": true}')
    assert_close(load_scores(tmp_path).extra["subblocks"], ranked)


def test_block_influence_scores_sub_blocks_and_a_dead_one_is_zero():
    from pruneflow.methods import block_influence

    model = tiny_causal_lm("llama", num_hidden_layers=3)
    spec = A.arch_for(model.config.model_type)
    with torch.no_grad():
        A.get(A.blocks(model, spec)[1], spec.o).weight.zero_()  # block 1's attention adds nothing
    scores = block_influence.score(model, spec, WINDOWS, Runtime())
    ranked = scores.extra["subblocks"]
    assert ranked.shape == (3, 2) and ranked[1, 0].item() == pytest.approx(0.0, abs=1e-9)
    assert (ranked[[0, 2], 0] > 1e-4).all() and (ranked[:, 1] > 1e-4).all()
    with torch.no_grad():  # a block's influence is its input against its output, as before
        states = model(input_ids=WINDOWS, output_hidden_states=True).hidden_states
    expected = 1 - torch.nn.functional.cosine_similarity(states[0].double(), states[1].double(), dim=-1).mean()
    assert scores.layers[0].item() == pytest.approx(expected.item(), abs=1e-6)
    plan = prune(model, spec, "block_influence", PruneParams(ratio=0.05, units=["subblocks"]), WINDOWS).plan
    assert not plan.layers[1].kept_heads and all(layer.kept_channels for layer in plan.layers)
