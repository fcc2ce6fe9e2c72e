"""prune.reconstruct: FLAP's bias for every width method, and the lstsq re-fit (in memory, streamed, iterative)."""

import pytest
import torch

from conftest import safetensors_of as _tensors
from conftest import tiny_causal_lm
from pruneflow.model import arch as A
from pruneflow.model import checkpoint
from pruneflow.units import reconstruct
from pruneflow.execution import blockwise, streaming
from pruneflow.errors import PruneflowError
from pruneflow.pipeline.params import BonsaiParams, PruneParams, load_params
from pruneflow.selection.plan import PrunePlan
from pruneflow.prune import prune
from pruneflow.execution.runtime import Runtime

WINDOWS = torch.randint(0, 256, (24, 16), generator=torch.Generator().manual_seed(0))  # 384 tokens ≥ 256 columns
BUDGET = 2_600_000  # below the 16-layer models' weights, above two blocks, the activations, the solve (2.2 MB)
BONSAI = BonsaiParams(preset="fast", sub_models=8, n_windows=4, rows_per_forward=8, tolerance=0.01)


def _distance(model, dense) -> float:
    """Mean squared difference of the logits on the calibration windows from the dense model's (random-init tiny
    models predict near-uniformly, so their loss says little; reproducing the dense model is what lstsq does)."""
    with torch.no_grad():
        return float((model(input_ids=WINDOWS).logits.float() - dense(input_ids=WINDOWS).logits.float()).pow(2).mean())



@pytest.mark.parametrize("method", ["wanda_sp", "flap", "magnitude"])
def test_lstsq_fits_the_dense_outputs_better_than_slicing_alone(method):
    """Every re-fitted projection reproduces the dense outputs at least as well as its sliced dense weights
    (the prior), and the whole model's logits are closer to the dense model's than without reconstruction."""
    losses, dense = {}, tiny_causal_lm(num_hidden_layers=3)
    for mode in ("none", "lstsq"):
        model = tiny_causal_lm(num_hidden_layers=3)
        result = prune(model, A.arch_for("llama"), method, PruneParams(ratio=0.4, reconstruct=mode), WINDOWS)
        assert result.plan.reconstruct == mode
        losses[mode] = _distance(model, dense)
        assert A.count_parameters(model)["non_embedding"] == result.plan.params["non_embedding_after"]
    assert len(result.reconstruction) == 3
    for block in result.reconstruction:
        for name in ("o", "down"):
            assert block[name]["error_after"] <= block[name]["error_before"] + 1e-9
        assert block["down"]["error_after"] < block["down"]["error_before"]
    assert losses["lstsq"] < losses["none"]
    assert not any(name.endswith(("o_proj.bias", "down_proj.bias")) for name, _ in model.named_parameters())


def _ridge_by_augmented_lstsq(x, y, prior, lam):
    """argmin_W ‖X Wᵀ − Y‖² + λ‖W − W0‖², by another algorithm: ordinary least squares (QR) on X stacked over
    √λ·I against Y stacked over √λ·W0ᵀ."""
    n = x.shape[1]
    a = torch.cat([x, lam ** 0.5 * torch.eye(n, dtype=x.dtype)])
    b = torch.cat([y, lam ** 0.5 * prior.T])
    return torch.linalg.lstsq(a, b).solution.T


def test_the_gram_solve_is_the_ridge_fit_pulled_towards_the_prior():
    """Accumulated in two chunks, with a noisy target and a non-zero prior: the solve is the ridge fit towards
    that prior (λ = DAMPING × the mean squared norm of an input column), found here by another algorithm; an
    input column that is zero on every token has no data, so its weights stay exactly the prior's."""
    torch.manual_seed(0)
    x = torch.randn(500, 6, dtype=torch.float64)
    x[:, 4] = 0  # a dead input channel
    w_true, prior = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    y = x @ w_true.T + 0.5 * torch.randn(500, 3, dtype=torch.float64)
    gram = reconstruct.Gram(torch.float64)
    gram.add(x[:200], y[:200])
    gram.add(x[200:], y[200:])
    lam = reconstruct.DAMPING * float((x * x).sum(0).sum() / 6)
    fit = gram.solve(prior)
    torch.testing.assert_close(fit, _ridge_by_augmented_lstsq(x, y, prior, lam), rtol=0, atol=1e-9)
    torch.testing.assert_close(fit[:, 4], prior[:, 4], rtol=0, atol=1e-12)
    assert not torch.allclose(fit, _ridge_by_augmented_lstsq(x, y, torch.zeros_like(prior), lam), atol=1e-3)


def test_the_gram_error_is_the_relative_squared_error_of_the_outputs():
    torch.manual_seed(1)
    x, y, w = (torch.randn(300, 5, dtype=torch.float64), torch.randn(300, 2, dtype=torch.float64),
               torch.randn(2, 5, dtype=torch.float64))
    gram = reconstruct.Gram(torch.float64)
    for xs, ys in zip(x.split(128), y.split(128)):
        gram.add(xs, ys)
    direct = float((x @ w.T - y).pow(2).sum() / y.pow(2).sum())
    assert gram.error(w) == pytest.approx(direct, rel=1e-10)
    assert gram.error(torch.zeros(2, 5, dtype=torch.float64)) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_lstsq_streamed_is_the_in_memory_result(kind, tmp_path):
    """qwen2: q/k/v biases, tied head. The streamed re-fit (dense blocks read from the files, the re-fitted
    projections kept on disk until the save) writes the in-memory weights."""
    dense = tmp_path / "dense"
    tiny_causal_lm(kind, num_hidden_layers=16).save_pretrained(dense, max_shard_size="300KB")
    dirs = []
    for name, budget in (("memory", None), ("streamed", BUDGET)):
        runtime = Runtime(max_memory=budget)
        model, _, spec = checkpoint.load(dense, runtime, with_tokenizer=False, stream=True, calibration=WINDOWS.shape)
        assert streaming.is_streamed(model) == (budget is not None)
        prune(model, spec, "flap", PruneParams(ratio=0.3, reconstruct="lstsq"), WINDOWS, runtime=runtime)
        checkpoint.save(model, None, tmp_path / name, spec, dtype=torch.float32, runtime=runtime)
        dirs.append(tmp_path / name)
    a, b = _tensors(dirs[0]), _tensors(dirs[1])
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[n], b[n], atol=1e-6, rtol=1e-5) for n in a)
    assert not all(torch.equal(a[n], _tensors(dense)[n]) for n in a if n in _tensors(dense))


def test_the_dense_blocks_an_iterative_method_keeps_are_on_disk_not_in_memory():
    model = tiny_causal_lm(num_hidden_layers=2).to(torch.bfloat16)
    spec = A.arch_for("llama")
    kept = blockwise.dense_copy(model, spec)
    assert len(kept) == 2
    assert all(t.is_meta for s in kept.skeletons for t in (*s.parameters(), *s.buffers()))
    for i, block in enumerate(A.blocks(model, spec)):
        back = kept[i]
        want = dict(block.state_dict())
        assert back.state_dict().keys() == want.keys()
        assert all(torch.equal(back.state_dict()[k], v) and back.state_dict()[k].dtype == torch.bfloat16
                   for k, v in want.items())


def test_lstsq_for_bonsai_refits_against_the_dense_blocks():
    dense = tiny_causal_lm(num_hidden_layers=2)
    results = {}
    for mode in ("none", "lstsq"):
        model = tiny_causal_lm(num_hidden_layers=2)
        results[mode] = prune(model, A.arch_for("llama"), "bonsai", PruneParams(ratio=0.3, reconstruct=mode),
                              WINDOWS, options=BONSAI)
        results[mode].distance = _distance(model, dense)
    assert results["none"].plan.layers == results["lstsq"].plan.layers  # the re-fit comes after the search
    assert results["lstsq"].distance < results["none"].distance
    assert len(results["lstsq"].reconstruction) == 2


@pytest.mark.parametrize("method", ["wanda_sp", "bonsai"])
def test_bias_works_for_methods_without_their_own_means(method):
    """The means come from one calibration pass of the dense model; Bonsai adds each iteration's bias."""
    model = tiny_causal_lm(num_hidden_layers=2)
    result = prune(model, A.arch_for("llama"), method, PruneParams(ratio=0.3, reconstruct="bias"), WINDOWS,
                   options=BONSAI if method == "bonsai" else None)
    assert result.plan.reconstruct == "bias"
    biases = [name for name, _ in model.named_parameters() if name.endswith(("o_proj.bias", "down_proj.bias"))]
    assert biases
    assert A.count_parameters(model)["non_embedding"] == result.plan.params["non_embedding_after"]


def test_bf16_lstsq_keeps_the_dtype():
    model = tiny_causal_lm(num_hidden_layers=2).to(torch.bfloat16)
    prune(model, A.arch_for("llama"), "wanda_sp", PruneParams(ratio=0.3, reconstruct="lstsq"), WINDOWS)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(torch.tensor(_distance(model, tiny_causal_lm(num_hidden_layers=2))))


def test_too_few_calibration_tokens_is_an_error_naming_the_minimum():
    model = tiny_causal_lm(num_hidden_layers=2)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(PruneflowError, match=r"256 input columns.*12 × 16 = 192.*n_windows ≥ 16 at seqlen 16"):
        prune(model, A.arch_for("llama"), "flap", PruneParams(ratio=0.3, reconstruct="lstsq"), WINDOWS[:12])
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # nothing touched


def test_reconstruction_params_and_old_plans():
    assert load_params(None, ["prune.compensate=true"]).prune.reconstruct == "bias"  # the old key
    assert load_params(None, ["prune.compensate=false"]).prune.reconstruct == "none"
    with pytest.raises(PruneflowError, match="give only reconstruct"):
        load_params(None, ["prune.compensate=true", "prune.reconstruct=lstsq"])
    with pytest.raises(PruneflowError, match="prune.reconstruct"):
        load_params(None, ["prune.reconstruct=ols"])
    with pytest.raises(PruneflowError, match="removes whole blocks"):
        prune(tiny_causal_lm(), A.arch_for("llama"), "block_influence", PruneParams(ratio=0.3, reconstruct="lstsq"),
              WINDOWS)
    old = {"method": "flap", "ratio": 0.3, "allocation": "uniform", "head_mode": "auto", "units": ["heads"],
           "round_to": 1, "compensate": True, "seed": 0, "layers": []}
    assert PrunePlan.from_dict(old).reconstruct == "bias"


def test_lstsq_on_an_encoder_refits_its_output_denses():
    """BERT (loaded as its base model, no LM head): the re-fit targets the dense model's attention-output and
    output dense projections before their residual LayerNorm, and the pruned encoder's last hidden states end
    closer to the dense ones than slicing alone (it crashed: 'BertModel' object has no attribute 'bert')."""
    from conftest import tiny_bert

    dense, spec, distance = tiny_bert(), A.arch_for("bert"), {}
    for mode in ("none", "lstsq"):
        model = tiny_bert()
        result = prune(model, spec, "wanda_sp", PruneParams(ratio=0.4, reconstruct=mode), WINDOWS)
        with torch.no_grad():
            distance[mode] = float((model(input_ids=WINDOWS).last_hidden_state
                                    - dense(input_ids=WINDOWS).last_hidden_state).pow(2).mean())
    assert [block["layer"] for block in result.reconstruction] == [0, 1]
    assert all(b[n]["error_after"] <= b[n]["error_before"] + 1e-9 for b in result.reconstruction for n in ("o", "down"))
    assert distance["lstsq"] < distance["none"]
