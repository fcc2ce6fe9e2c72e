"""LoRA recovery (peft) on a pruned tiny model: it learns, merges exactly, saves and reloads, is deterministic."""

import copy

import pytest
import torch
from torch.testing import assert_close

from conftest import tiny_causal_lm
from pruneflow.model import arch as A
from pruneflow.model import checkpoint
from pruneflow.errors import PruneflowError
from pruneflow.pipeline.params import PruneParams, RecoverParams
from pruneflow.prune import prune
from pruneflow.pipeline.recover import distillation_loss, next_token_loss, recover, train_lora

WINDOWS = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(0))
CFG = RecoverParams(steps=30, batch_size=4, seqlen=32, lr=5e-3, warmup_steps=2, rank=4, alpha=8)


@pytest.fixture
def pruned():
    """A tiny Llama pruned 30% with global allocation (per-layer widths differ), and its dense teacher."""
    dense = tiny_causal_lm("llama")
    model = copy.deepcopy(dense)
    spec = A.arch_for(model.config.model_type)
    prune(model, spec, "wanda_sp", PruneParams(ratio=0.3, allocation="global"), WINDOWS[:8])
    return model, dense, spec


@torch.no_grad()
def loss_on(model, windows=WINDOWS):
    return next_token_loss(model(input_ids=windows).logits, windows).item()


def test_recovery_lowers_the_training_loss_and_keeps_every_shape(pruned):
    model, dense, spec = pruned
    shapes = {n: p.shape for n, p in model.named_parameters()}
    before = loss_on(model)
    result = recover(model, WINDOWS, spec, CFG, teacher=dense)
    assert loss_on(result.model) < before - 0.05
    assert {n: p.shape for n, p in result.model.named_parameters()} == shapes  # adapters merged, none left
    assert len(result.history) == CFG.steps and result.history[0]["lr"] < CFG.lr  # warm-up


def test_the_merged_model_equals_the_peft_model_and_round_trips_through_a_checkpoint(pruned, tmp_path):
    model, dense, spec = pruned
    student, _ = train_lora(model, WINDOWS, spec, CFG, teacher=dense)
    ids = WINDOWS[:2]
    with torch.no_grad():
        adapted = student(input_ids=ids).logits
    merged = student.merge_and_unload().eval()
    with torch.no_grad():
        assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
    checkpoint.save(merged, None, tmp_path / "recovered", spec)
    reloaded, _, _ = checkpoint.load(tmp_path / "recovered", with_tokenizer=False)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_the_distillation_term_is_zero_for_identical_models_and_positive_otherwise():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    assert distillation_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits, logits.flip(-1)).item() > 0.1


def test_recovery_is_deterministic_for_a_seed(pruned):
    model, dense, spec = pruned
    cfg = CFG.model_copy(update={"steps": 5})
    first = recover(copy.deepcopy(model), WINDOWS, spec, cfg, teacher=dense).model.state_dict()
    second = recover(copy.deepcopy(model), WINDOWS, spec, cfg, teacher=dense).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = recover(copy.deepcopy(model), WINDOWS, spec, cfg.model_copy(update={"seed": 1}), teacher=dense)
    assert any(not torch.equal(first[k], v) for k, v in other.model.state_dict().items())


def test_a_target_the_model_does_not_have_is_a_clear_error():
    from conftest import tiny_bert

    model = tiny_bert()
    spec = A.arch_for(model.config.model_type)
    with pytest.raises(PruneflowError, match="recover.targets: 'gate' is not a module of this model"):
        recover(model, WINDOWS, spec, CFG.model_copy(update={"targets": ["q", "gate"]}))
    with pytest.raises(ValueError, match="targets must be a non-empty subset"):
        RecoverParams(targets=["lm_head"])


def test_precomputed_teacher_states_train_exactly_as_the_teacher_in_memory(pruned):
    """The teacher's hidden states computed once before training (then the teacher can be freed) give the same
    recovered weights, bit for bit, as running the teacher at every step."""
    from pruneflow.pipeline.recover import teacher_states

    model, dense, spec = pruned
    cfg = CFG.model_copy(update={"steps": 6, "distill_weight": 0.5})
    live = recover(copy.deepcopy(model), WINDOWS, spec, cfg, teacher=dense).model.state_dict()
    states = teacher_states(dense, WINDOWS, cfg)
    assert len(states.states) == cfg.steps and states.states[0].shape == (cfg.batch_size, 32, 64)
    cached = recover(copy.deepcopy(model), WINDOWS, spec, cfg, teacher=states).model.state_dict()
    assert all(torch.equal(live[k], cached[k]) for k in live)


def test_the_teacher_states_are_kept_only_when_smaller_than_the_teacher():
    from pruneflow.pipeline.recover import precompute_pays

    class Config:
        hidden_size = 4096

    # Llama-3-8B as teacher (16 GB in bf16), 200 steps × 8 × 256 tokens: 3.4 GB of states
    assert precompute_pays(Config, 16 * 2**30, RecoverParams(), torch.bfloat16)
    # the reference model (32 MB in fp32, hidden 256): 420 MB of states, so the teacher stays
    Config.hidden_size = 256
    assert not precompute_pays(Config, 32 * 10**6, RecoverParams(), torch.float32)


def test_a_teacher_with_another_head_is_refused(pruned):
    model, _, spec = pruned
    other = tiny_causal_lm("llama", seed=5)
    with pytest.raises(PruneflowError, match="the pruned model's LM head is not the dense model's"):
        recover(model, WINDOWS, spec, CFG.model_copy(update={"steps": 1}), teacher=other)


def test_gradient_checkpointing_changes_memory_not_the_result(pruned):
    model, dense, spec = pruned
    cfg = CFG.model_copy(update={"steps": 4})
    plain = recover(copy.deepcopy(model), WINDOWS, spec, cfg.model_copy(update={"gradient_checkpointing": False}),
                    teacher=dense)
    checkpointed = recover(copy.deepcopy(model), WINDOWS, spec,
                           cfg.model_copy(update={"gradient_checkpointing": True}), teacher=dense)
    assert checkpointed.gradient_checkpointing and not plain.gradient_checkpointing
    assert not checkpointed.model.is_gradient_checkpointing  # switched off again for inference
    for (name, a), b in zip(plain.model.state_dict().items(), checkpointed.model.state_dict().values()):
        assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert plain.history[-1]["loss"] == pytest.approx(checkpointed.history[-1]["loss"], rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_recovery_of_a_16_bit_model_learns_and_keeps_its_dtype(dtype):
    """fp16 trains with loss scaling (its gradients underflow otherwise); bf16 without; adapters merge in."""
    dense = tiny_causal_lm("llama").to(dtype)
    model = copy.deepcopy(dense)
    spec = A.arch_for("llama")
    prune(model, spec, "wanda_sp", PruneParams(ratio=0.3), WINDOWS[:8])
    before = loss_on(model)
    result = recover(model, WINDOWS, spec, CFG, teacher=dense)
    assert {p.dtype for p in result.model.parameters()} == {dtype}
    assert loss_on(result.model) < before - 0.05
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_training_shows_users_no_warning_of_peft_reading_a_deprecated_transformers_alias(pruned,
                                                                                           checkpointing):
    """Every recover stage printed transformers' FutureWarning on peft's `is_gradient_checkpointing`."""
    import warnings

    model, _, spec = pruned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_lora(model, WINDOWS, spec, CFG.model_copy(update={"steps": 1}), checkpointing=checkpointing)
    assert [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)] == []
