import torch
from torch.testing import assert_close

from pruneflow.methods.flap import fluctuation
from pruneflow.methods.wanda_sp import channel_importance
from pruneflow.methods.inputs import per_head
from pruneflow.selection.scores import InputStats


def test_wanda_sp_is_mean_abs_weight_times_input_norm():
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.0]])  # (out=2, in=2)
    l2 = torch.tensor([2.0, 10.0], dtype=torch.float64)
    # channel 0: mean(|1|, |3|) * 2 = 4; channel 1: mean(|-2|, 0) * 10 = 10
    assert_close(channel_importance(weight, l2), torch.tensor([4.0, 10.0], dtype=torch.float64))


def test_flap_is_variance_times_squared_column_norm():
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    var = torch.tensor([0.5, 2.0], dtype=torch.float64)
    # ‖W[:,0]‖² = 10, ‖W[:,1]‖² = 4
    assert_close(fluctuation(weight, var), torch.tensor([5.0, 8.0], dtype=torch.float64))


def test_input_stats_match_direct_moments():
    x = torch.randn(50, 3, dtype=torch.float64)
    stats = InputStats(x.sum(0), (x * x).sum(0), 50)
    assert_close(stats.mean, x.mean(0))
    assert_close(stats.var, x.var(0))
    assert_close(stats.l2, x.norm(dim=0))


def test_per_head_averages_each_heads_dimensions():
    scores = torch.tensor([1.0, 3.0, 10.0, 20.0])
    assert_close(per_head(scores, head_dim=2), torch.tensor([2.0, 15.0]))


def test_zscore_standardizes_and_handles_no_spread():
    from pruneflow.selection.scores import zscore

    z = zscore(torch.tensor([1.0, 2.0, 3.0]))
    assert_close(z, torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(zscore(torch.tensor([5.0, 5.0])), torch.zeros(2))
    assert torch.equal(zscore(torch.tensor([5.0])), torch.zeros(1))


def test_taylor_saliency_matches_a_hand_computed_value():
    """One linear layer, L = sum(W x): ∂L/∂W[i, j] = x_j, so row i's saliency is Σ_j |W[i, j] · x_j|."""
    from pruneflow.methods.taylor import _column_saliency, _row_saliency

    layer = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
    x = torch.tensor([2.0, 1.0, -4.0])
    layer(x).sum().backward()
    grads = {layer.weight: layer.weight.grad}
    # |W ⊙ g| = [[2, 2, 2], [0, 3, 4]]
    assert_close(_row_saliency(layer, grads), torch.tensor([6.0, 7.0], dtype=torch.float64))
    assert_close(_column_saliency(layer, grads), torch.tensor([2.0, 5.0, 6.0], dtype=torch.float64))


def test_taylor_sums_a_bf16_models_gradients_over_batches_in_float32():
    """Each batch's bf16 gradient, summed over 16 batches: Taylor's channel scores equal the ones from the float64
    sum of the same per-batch gradients to float32 rounding (bf16 .grad accumulated across batches: ~1e-3 off)."""
    from conftest import tiny_causal_lm
    from pruneflow.model import arch as A
    from pruneflow.execution.losses import training_losses
    from pruneflow.methods import taylor
    from pruneflow.execution.runtime import Runtime

    model = tiny_causal_lm(num_hidden_layers=1).to(torch.bfloat16)
    spec = A.arch_for("llama")
    windows = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(0))
    scores = taylor.score(model, spec, windows, Runtime(), batch_size=1)
    block = A.blocks(model, spec)[0]
    layers = [A.get(block, path) for path in (spec.gate, spec.up, spec.down)]
    sums = {layer.weight: torch.zeros_like(layer.weight, dtype=torch.float64) for layer in layers}
    for window in windows:  # one backward per batch as Taylor runs them, each gradient added in float64
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            (training_losses(model, window[None])[0] / len(windows)).backward()
        for weight, total in sums.items():
            assert weight.grad.dtype == torch.bfloat16
            total += weight.grad.double()
    gate, up, down = ((layer.weight.detach().double() * sums[layer.weight]).abs() for layer in layers)
    expected = gate.sum(1) + up.sum(1) + down.sum(0)
    assert_close(scores.channels[0].double(), expected, rtol=1e-4, atol=0)


def test_flap_ranks_heads_by_the_squared_attention_metric_on_a_planted_case():
    """FLAP squares the attention WIFV (variance of o_proj's input channel × its squared column norm) before
    standardizing and averaging per head. o_proj's columns are scaled here so that the two heads' channels have
    WIFVs (0, 4) and (2, 2.5): means 2 and 2.25 — unsquared, head B ranks first — but squared (0, 16) and
    (4, 6.25), means 8 and 5.125, so flap.score must rank head A first."""
    from conftest import tiny_causal_lm
    from pruneflow.model import arch as A
    from pruneflow.methods import flap
    from pruneflow.execution.runtime import Runtime

    model = tiny_causal_lm(hidden_size=4, num_attention_heads=2, num_key_value_heads=1, intermediate_size=8,
                           num_hidden_layers=1)
    spec, o_proj = A.arch_for("llama"), model.model.layers[0].self_attn.o_proj
    windows = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    inputs = []
    handle = o_proj.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].reshape(-1, 4)))
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    variance = torch.cat(inputs).double().var(0)  # (4,) o_proj's input channels; o_proj's weights don't change it
    wifv = torch.tensor([0.0, 4.0, 2.0, 2.5], dtype=torch.float64)
    with torch.no_grad():  # column j's squared norm := wifv_j / variance_j
        column_norms = o_proj.weight.double().pow(2).sum(0)
        o_proj.weight.mul_((wifv / variance / column_norms).sqrt().float())
    heads = flap.score(model, spec, windows, Runtime()).heads[0]  # (2,)
    assert heads[0] > heads[1]


def test_flap_score_is_flaps_prune_flap_on_a_tiny_model():
    """flap.score against FLAP's lib/prune.py written out: WIFV per o_proj/down_proj input channel, attention
    squared, (x - mean) / std per layer over channels, heads = mean over head_dim."""
    from conftest import tiny_causal_lm
    from pruneflow.model import arch as A
    from pruneflow.methods import flap
    from pruneflow.execution.runtime import Runtime

    model, spec = tiny_causal_lm(num_hidden_layers=2), A.arch_for("llama")
    windows = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    inputs = {}
    handles = [A.get(block, path).register_forward_pre_hook(
        lambda _m, args, key=(i, name): inputs.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for i, block in enumerate(A.blocks(model, spec)) for name, path in (("o", spec.o), ("down", spec.down))]
    with torch.no_grad():
        model(input_ids=windows)
    for handle in handles:
        handle.remove()
    std = lambda x: (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True)  # noqa: E731  FLAP's
    attn, mlp = [], []
    for i, block in enumerate(A.blocks(model, spec)):
        for name, path, out in (("o", spec.o, attn), ("down", spec.down, mlp)):
            x = torch.cat(inputs[(i, name)]).double()
            metric = x.var(0) * A.get(block, path).weight.double().pow(2).sum(0)
            out.append(metric ** 2 if name == "o" else metric)
    heads = std(torch.stack(attn)).reshape(2, -1, 16).mean(dim=2)
    channels = std(torch.stack(mlp))
    scores = flap.score(model, spec, windows, Runtime())
    assert_close(torch.stack(scores.heads).double(), heads, rtol=1e-5, atol=1e-5)
    assert_close(torch.stack(scores.channels).double(), channels, rtol=1e-5, atol=1e-5)
