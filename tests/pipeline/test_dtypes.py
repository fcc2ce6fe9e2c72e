"""bf16 and fp16 checkpoints, every method, on the CPU: pruned in their own dtype, saved in it (strictly smaller
on disk than the input), loading with transformers to the same logits; statistics kept in float64."""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_causal_lm, tiny_moe
from pruneflow.model import checkpoint
from pruneflow.evaluation.evaluate import size_on_disk
from pruneflow.methods import METHODS
from pruneflow.pipeline.params import BonsaiParams, PruneParams
from pruneflow.prune import prune
from pruneflow.execution.runtime import Runtime
from pruneflow.selection.scores import InputStats

WINDOWS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
BONSAI = BonsaiParams(preset="fast", sub_models=8, n_windows=4, rows_per_forward=8, tolerance=0.01)


def _stored(path):
    kinds = set()
    for weights in path.glob("*.safetensors"):
        with safe_open(weights, framework="pt") as f:
            kinds |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return kinds


def _saved(dtype, tmp_path, moe: bool = False):
    path = tmp_path / "dense"
    model = tiny_moe("qwen3_moe", num_hidden_layers=4) if moe else tiny_causal_lm("llama", num_hidden_layers=4)
    model.to(dtype).save_pretrained(path, max_shard_size="200KB")
    return path


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_method_prunes_a_16_bit_checkpoint_and_saves_it_in_its_dtype(method, dtype, tmp_path):
    dense_dir = _saved(dtype, tmp_path, moe=METHODS[method].experts)  # expert methods: a Qwen3-MoE
    model, _, spec = checkpoint.load(dense_dir, Runtime(), with_tokenizer=False)
    assert model.dtype == dtype  # auto: the checkpoint's own
    cfg = PruneParams(ratio=0.3)
    result = prune(model, spec, method, cfg, WINDOWS, options=BONSAI if method == "bonsai" else None)
    if METHODS[method].depth or METHODS[method].units == ("merged_layers",):  # whole blocks (LaCo: folded): the
        # one block of four closest to 30%
        assert len(result.plan.kept_layers) == 3
    elif METHODS[method].experts:  # whole experts: one from every block is 1/8 of the MLP parameters
        assert abs(result.plan.params["achieved_ratio"] - 0.3) < 0.06
    else:
        assert abs(result.plan.params["achieved_ratio"] - 0.3) < 0.02
    assert all(torch.isfinite(p).all() for p in model.parameters())
    out = tmp_path / "pruned"
    checkpoint.save(model, None, out, spec, dtype=checkpoint.stored_dtype(dense_dir))
    assert _stored(out) == {"BF16" if dtype == torch.bfloat16 else "F16"}
    assert size_on_disk(out) < size_on_disk(dense_dir)
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    loaded, _, _ = checkpoint.load(out, with_tokenizer=False)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


@pytest.mark.parametrize("method", sorted(m for m, entry in METHODS.items() if entry.expert_channels))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_channels_inside_experts_prune_a_16_bit_moe_checkpoint_and_save_it_in_its_dtype(method, dtype,
                                                                                          tmp_path):
    """Widths in steps of 8: the saved model runs with transformers' grouped_mm experts kernel in 16 bits."""
    dense_dir = _saved(dtype, tmp_path, moe=True)
    model, _, spec = checkpoint.load(dense_dir, Runtime(), with_tokenizer=False)
    cfg = PruneParams(ratio=0.3, units=["channels"], reconstruct="none")  # flap: global, per-layer widths
    result = prune(model, spec, method, cfg, WINDOWS)
    assert all(w % 8 == 0 and w < 32 for w in result.plan.params["expert_width_after"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    out = tmp_path / "pruned"
    checkpoint.save(model, None, out, spec, dtype=checkpoint.stored_dtype(dense_dir))
    assert _stored(out) == {"BF16" if dtype == torch.bfloat16 else "F16"}
    assert size_on_disk(out) < size_on_disk(dense_dir)
    loaded, _, _ = checkpoint.load(out, with_tokenizer=False)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_scoring_in_float32_still_saves_the_input_dtype(tmp_path):
    dense_dir = _saved(torch.bfloat16, tmp_path)
    runtime = Runtime.create("cpu", "float32")
    model, _, spec = checkpoint.load(dense_dir, runtime, with_tokenizer=False)
    assert model.dtype == torch.float32
    prune(model, spec, "flap", PruneParams(ratio=0.3), WINDOWS, runtime=runtime)
    checkpoint.save(model, None, tmp_path / "out", spec, dtype=checkpoint.stored_dtype(dense_dir))
    assert _stored(tmp_path / "out") == {"BF16"}
    assert size_on_disk(tmp_path / "out") < size_on_disk(dense_dir)


def test_statistics_of_16_bit_activations_accumulate_in_float64():
    x = (torch.randn(600, 8) * 50).to(torch.bfloat16)
    stats = InputStats()
    stats.add(x)  # 600 rows: several chunks
    assert stats.total.dtype == torch.float64 and stats.count == 600
    torch.testing.assert_close(stats.total, x.double().sum(0))
    torch.testing.assert_close(stats.total_sq, (x.double() ** 2).sum(0))


def test_the_dtype_of_a_checkpoint_is_read_from_its_weights(tmp_path):
    assert checkpoint.stored_dtype(_saved(torch.float16, tmp_path)) == torch.float16
    model = tiny_causal_lm("llama")
    model.save_pretrained(tmp_path / "fp32")
    assert checkpoint.stored_dtype(tmp_path / "fp32") == torch.float32
