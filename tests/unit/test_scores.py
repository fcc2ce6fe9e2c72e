import torch
from torch.testing import assert_close

from pruneflow.methods.flap import fluctuation
from pruneflow.methods.wanda_sp import channel_importance
from pruneflow.scores import InputStats, per_head


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
    from pruneflow.scores import zscore

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
    # |W ⊙ g| = [[2, 2, 2], [0, 3, 4]]
    assert_close(_row_saliency(layer), torch.tensor([6.0, 7.0], dtype=torch.float64))
    assert_close(_column_saliency(layer), torch.tensor([2.0, 5.0, 6.0], dtype=torch.float64))
