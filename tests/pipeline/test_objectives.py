"""``score.objective``: what candidate sub-models are measured by (loss, KL to the unmasked model, distance of the
final hidden states), in memory and streamed, and the methods and the search that use it on encoders."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_bert, tiny_causal_lm
from pruneflow.errors import PruneflowError
from pruneflow.execution import passes, streaming
from pruneflow.execution.candidates import Candidates
from pruneflow.execution.objectives import resolve
from pruneflow.execution.runtime import Runtime
from pruneflow.model import arch as A
from pruneflow.model import checkpoint
from pruneflow.pipeline.params import BonsaiParams, PruneParams
from pruneflow.prune import check_model, prune

WINDOWS = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(0))


def _skip_each_block(n_layers: int) -> Candidates:
    """The unmasked model, then each block skipped in turn."""
    return Candidates.of_blocks([set()] + [{i} for i in range(n_layers)], n_layers)


def test_auto_is_the_papers_loss_and_an_encoder_gets_the_hidden_distance():
    assert resolve("auto", causal_lm=True) == "loss" and resolve("auto", causal_lm=False) == "hidden"
    assert resolve("kl", causal_lm=True) == "kl" and resolve("hidden", causal_lm=True) == "hidden"
    for kind in ("loss", "kl"):
        with pytest.raises(PruneflowError, match=f"objective: {kind} compares next-token predictions and needs a "
                                                  f"causal LM.*use objective hidden"):
            resolve(kind, causal_lm=False)


@pytest.mark.parametrize("kind", ["kl", "hidden"])
def test_the_unmasked_model_measures_zero_and_every_skipped_block_more(kind):
    model, spec = tiny_causal_lm(num_hidden_layers=3), A.arch_for("llama")
    runtime = Runtime()
    objective = passes.objective(model, spec, WINDOWS, runtime, kind)
    assert objective.reference.shape == (6, 16, 64)
    values = passes.losses(model, spec, WINDOWS, _skip_each_block(3), runtime, rows_per_forward=4,
                           objective=objective)
    assert abs(float(values[0])) < 1e-6 and bool((values[1:] > 1e-4).all())


def test_kl_and_hidden_are_what_they_say_on_one_candidate():
    """Against a direct computation: KL(unmasked ‖ candidate) of the next-token distributions and 1 − cos of the
    final hidden states, averaged over every position of every window."""
    model, spec, runtime = tiny_causal_lm(num_hidden_layers=3), A.arch_for("llama"), Runtime()
    with torch.no_grad():
        dense_logits = model(input_ids=WINDOWS).logits.float()
        dense_hidden = model.model(input_ids=WINDOWS).last_hidden_state.float()
        skipped = A.set_blocks(model, spec, torch.nn.ModuleList([model.model.layers[0], model.model.layers[2]]))
        logits = model(input_ids=WINDOWS, use_cache=False).logits.float()
        hidden = model.model(input_ids=WINDOWS, use_cache=False).last_hidden_state.float()
        A.set_blocks(model, spec, skipped)
    kl = F.kl_div(logits.log_softmax(-1), dense_logits.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    cos = 1 - F.cosine_similarity(hidden, dense_hidden, dim=-1)
    candidate = Candidates.of_blocks([{1}], 3)
    for kind, expected in (("kl", kl.mean()), ("hidden", cos.mean())):
        measured = passes.losses(model, spec, WINDOWS, candidate, runtime,
                                 objective=passes.objective(model, spec, WINDOWS, runtime, kind))
        torch.testing.assert_close(measured[0].float(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["loss", "kl", "hidden"])
def test_streamed_measures_equal_the_in_memory_ones(kind, tmp_path):
    dense = tmp_path / "dense"
    tiny_causal_lm(num_hidden_layers=4).save_pretrained(dense, max_shard_size="300KB")
    values = []
    for budget in (None, 1_100_000):
        runtime = Runtime(max_memory=budget)
        model, _, spec = checkpoint.load(dense, runtime, with_tokenizer=False, stream=True, calibration=WINDOWS.shape)
        assert streaming.is_streamed(model) == (budget is not None)
        objective = passes.objective(model, spec, WINDOWS, runtime, kind)
        values.append(passes.losses(model, spec, WINDOWS, _skip_each_block(4), runtime, rows_per_forward=4,
                                    objective=objective))
    torch.testing.assert_close(values[1], values[0], rtol=1e-5, atol=1e-7)


def _bert_with_dead_layer(dead: int):
    """A tiny 3-block BERT whose block ``dead`` adds nothing to the residual stream (its attention and MLP output
    denses are zero): with post-LN weights 1 and biases 0 the block passes its (already normalised) input through."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, max_position_embeddings=128)
    model = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        block = model.encoder.layer[dead]
        for dense in (block.attention.output.dense, block.output.dense):
            dense.weight.zero_()
            dense.bias.zero_()
    return model


def test_sleb_runs_on_an_encoder_and_removes_the_dead_block_first():
    model, spec = _bert_with_dead_layer(1), A.arch_for("bert")
    check_model("sleb", spec, PruneParams(ratio=0.3))  # no longer refused: auto is the hidden-state distance
    result = prune(model, spec, "sleb", PruneParams(ratio=0.3), WINDOWS, runtime=Runtime())
    assert result.scores.extra["objective"] == "hidden" and result.scores.extra["removal_order"][0] == 1
    assert result.plan.kept_layers == [0, 2]


def test_blockpruner_finds_a_dead_sub_block_by_the_hidden_distance_on_a_causal_lm():
    model, spec = tiny_causal_lm(num_hidden_layers=3), A.arch_for("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()  # block 1's MLP adds nothing
    result = prune(model, spec, "blockpruner", PruneParams(ratio=0.1), WINDOWS, runtime=Runtime(), objective="hidden")
    assert result.scores.extra["objective"] == "hidden" and result.scores.extra["removal_order"][0] == "mlp 1"


def test_bonsai_and_the_allocation_search_run_on_an_encoder():
    spec = A.arch_for("bert")
    model = tiny_bert()
    options = BonsaiParams(preset="fast", sub_models=8, n_windows=4, rows_per_forward=8, tolerance=0.02)
    result = prune(model, spec, "bonsai", PruneParams(ratio=0.2), WINDOWS, options=options, runtime=Runtime())
    assert abs(result.plan.params["achieved_ratio"] - 0.2) <= 0.05
    model = tiny_bert()
    cfg = PruneParams(ratio=0.3, allocation="search", search={"budget": 6, "offspring": 2, "windows": 4})
    result = prune(model, spec, "flap", cfg, WINDOWS, runtime=Runtime())
    assert result.search["objective"] == "hidden" and result.search["best_loss"] <= result.search["start_loss"]
    assert result.plan.allocation == "search"


def test_kl_drives_sleb_on_a_causal_lm_and_the_score_says_so():
    model, spec = tiny_causal_lm(num_hidden_layers=4), A.arch_for("llama")
    result = prune(model, spec, "sleb", PruneParams(ratio=0.2), WINDOWS, runtime=Runtime(), objective="kl")
    assert result.scores.extra["objective"] == "kl" and len(result.plan.kept_layers) == 3


@pytest.mark.parametrize("method, cfg, objective, message", [
    ("taylor", PruneParams(ratio=0.3), "auto", "method taylor needs gradients of the next-token loss and a causal "
                                               "LM; this model is an encoder: use"),
    ("blockpruner", PruneParams(ratio=0.3), "auto", "prune.units: subblocks removes the attention or the dense MLP "
                                                    "of a decoder block"),
    ("sleb", PruneParams(ratio=0.3), "kl", "score.objective: kl compares next-token predictions"),
    ("flap", PruneParams(ratio=0.3, allocation="search"), "loss", "score.objective: loss compares next-token"),
    ("flap", PruneParams(ratio=0.3, allocation="global"), "hidden", "score.objective: hidden measures candidate "
                                                                     "sub-models, and method flap with "
                                                                     "prune.allocation: global scores none"),
])
def test_what_does_not_apply_is_refused_from_the_config_alone(method, cfg, objective, message):
    with pytest.raises(PruneflowError, match=message):
        check_model(method, A.arch_for("bert"), cfg, objective)


def test_the_methods_offered_to_an_encoder_are_the_ones_it_takes():
    """The refusal of a causal-LM method lists what an encoder can use instead: no method it would refuse too
    (BlockPruner's sub-blocks and Minitron's norms are decoder-only)."""
    with pytest.raises(PruneflowError) as refused:
        check_model("taylor", A.arch_for("bert"), PruneParams(ratio=0.3))
    offered = str(refused.value).split("use ")[-1].split(", ")
    assert {"wanda_sp", "flap", "bonsai", "sleb"} <= set(offered)
    assert not {"taylor", "blockpruner", "minitron", "expert_drop"} & set(offered)
    for method in offered:
        check_model(method, A.arch_for("bert"), PruneParams(ratio=0.3))
