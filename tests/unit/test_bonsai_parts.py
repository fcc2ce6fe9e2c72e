"""Bonsai's parts: the sampler, the regression, batched sub-model evaluation, the per-unit scores."""

import math

import pytest
import torch

from pruneflow.model import arch as A
from pruneflow.methods.lasso import fit_cv, kendall_tau, lasso
from pruneflow.methods import bonsai
from tests.conftest import tiny_causal_lm


def _modules(counts: list[int]) -> list[bonsai.Module]:
    modules, start = [], 0
    for i, count in enumerate(counts):
        modules.append(bonsai.Module(layer=i, kind="channels", start=start, count=count, cost=1, repeat=1))
        start += count
    return modules


@pytest.mark.parametrize("drop_count", ["fixed", "varied"])
def test_sampler_respects_safe_units_and_pairs_each_draw_with_its_complement(drop_count):
    modules = _modules([40, 4, 30])
    priors = torch.rand(74, generator=torch.Generator().manual_seed(0)).double()
    keep, candidates = bonsai.sample_masks(modules, priors, 0.05, 20, drop_count, torch.Generator().manual_seed(1))
    assert keep.shape == (20, 74)
    assert keep[:, ~candidates].all()  # safe units are never dropped
    for module in modules:
        pool = candidates[module.span]
        expected, drop = bonsai.candidate_count(module.count, 0.05)
        assert int(pool.sum()) == expected
        # the candidates are the module's lowest priors
        assert priors[module.span][pool].max() <= priors[module.span][~pool].min()
        for pair in range(10):
            draw, complement = ~keep[2 * pair, module.span], ~keep[2 * pair + 1, module.span]
            assert not (draw & complement).any() and torch.equal(draw | complement, pool)
            if drop_count == "fixed":
                assert int(draw.sum()) == drop
            assert keep[2 * pair, module.span].any()  # a module is never emptied


def test_a_module_down_to_one_unit_is_never_perturbed():
    modules = _modules([1, 10])
    keep, candidates = bonsai.sample_masks(modules, torch.rand(11).double(), 0.05, 8, "varied",
                                           torch.Generator().manual_seed(0))
    assert not candidates[0] and keep[:, 0].all() and int(candidates.sum()) == bonsai.candidate_count(10, 0.05)[0]


def test_four_kv_groups_at_the_paper_fraction_get_two_varying_candidates():
    # the paper's rule keeps int(0.9·4) = 3 safe: one candidate, dropped by every draw, kept by every complement,
    # so the columns of all layers would be identical
    assert bonsai.candidate_count(4, 0.05) == (2, 1)
    modules = _modules([4, 4, 4])
    keep, candidates = bonsai.sample_masks(modules, torch.arange(12.0).double(), 0.05, 40, "fixed",
                                           torch.Generator().manual_seed(0))
    columns = keep[:, candidates].double()
    assert columns.std(0).min() > 0
    distinct = {tuple(columns[:, j].tolist()) for j in range(columns.shape[1])}
    assert len(distinct) >= 4  # not one column repeated per layer


def test_varied_drop_counts_make_module_totals_vary():
    modules = _modules([40, 40])
    keep, _ = bonsai.sample_masks(modules, torch.rand(80).double(), 0.05, 40, "varied",
                                  torch.Generator().manual_seed(0))
    assert len(set(keep[:, :40].sum(1).tolist())) > 3
    fixed, _ = bonsai.sample_masks(modules, torch.rand(80).double(), 0.05, 40, "fixed",
                                   torch.Generator().manual_seed(0))
    assert len(set(fixed[:, :40].sum(1).tolist())) <= 2  # draw or complement: the level is unidentifiable


def test_kendall_tau_matches_hand_values():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert kendall_tau(a, a) == pytest.approx(1.0)
    assert kendall_tau(a, -a) == pytest.approx(-1.0)
    # pairs (12)(13)(14)(23)(24)(34) on [1,3,2,4]: one discordant pair → (5 − 1) / 6
    assert kendall_tau(a, torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(4 / 6)
    assert kendall_tau(a, torch.ones(4)) == 0.0


def test_lasso_without_penalty_solves_least_squares_and_ignores_constant_columns():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(50, 5, generator=gen).double()
    x[:, 3] = 1.0
    truth = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    y = x @ truth + 0.25
    weights, intercept = lasso(x, y, 0.0, max_iter=20000)
    torch.testing.assert_close(weights[[0, 1, 2, 4]], truth[[0, 1, 2, 4]], atol=1e-6, rtol=0)
    assert weights[3] == 0.0 and intercept == pytest.approx(0.25, abs=1e-5)


def test_regression_recovers_planted_importances():
    gen = torch.Generator().manual_seed(0)
    n_units = 60
    planted = 0.2 + 0.8 * torch.rand(n_units, generator=gen).double()  # useful units: at least 0.2
    planted[:8] = torch.linspace(0.0, 0.02, 8, dtype=torch.float64)  # eight nearly useless units
    keep = (torch.rand(200, n_units, generator=gen) > 0.5).double()
    y = keep @ planted + 0.05 * torch.randn(200, generator=gen, dtype=torch.float64)
    fit = fit_cv(keep, y, folds=5, seed=0)
    assert fit.cv_tau > 0.9
    assert set(fit.weights.argsort()[:8].tolist()) == set(range(8))
    assert kendall_tau(fit.weights, planted) > 0.85


def _fista(x, y, penalty, steps=4000):
    """One lasso fit by FISTA written plainly on the explicitly centred rows (the unbatched algorithm)."""
    xc, yc = x - x.mean(0), y - y.mean()
    lipschitz = float(torch.linalg.matrix_norm(xc, ord=2)) ** 2 / len(x)
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    momentum, t = w.clone(), 1.0
    for _ in range(steps):
        shrunk = momentum - xc.T @ (xc @ momentum - yc) / len(x) / lipschitz
        updated = shrunk.sign() * (shrunk.abs() - penalty / lipschitz).clamp(min=0)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        momentum, w, t = updated + (t - 1) / t_next * (updated - w), updated, t_next
    return w, float(y.mean() - x.mean(0) @ w)


def test_batched_fits_each_equal_the_plain_fit_on_their_own_rows():
    """Every penalty × row subset of one batched solve is the fit of its rows alone (well-posed problems, where
    FISTA converges: more rows than columns)."""
    from pruneflow.methods.lasso import lasso_batch

    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(120, 30, generator=gen) > 0.5).double()
    y = x @ torch.randn(30, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(120, generator=gen,
                                                                                    dtype=torch.float64)
    rows = torch.rand(4, 120, generator=gen) > 0.2  # four different row subsets
    penalties = torch.tensor([0.0, 1e-3, 1e-2, 0.1], dtype=torch.float64)
    weights, intercepts = lasso_batch(x, y, rows, penalties, max_iter=4000, tol=0.0)  # the same 4,000 steps
    for f in range(4):
        w, b = _fista(x[rows[f]], y[rows[f]], float(penalties[f]))
        torch.testing.assert_close(weights[f], w, atol=1e-8, rtol=0)
        assert float(intercepts[f]) == pytest.approx(b, abs=1e-8)
    assert (weights[3] == 0).sum() > (weights[0] == 0).sum()  # the strong penalty zeroes more columns


def test_batched_fits_stop_each_at_its_own_convergence():
    """A fit that converges early is frozen there: in a batch with a slow fit it gives what it gives alone."""
    from pruneflow.methods.lasso import lasso_batch

    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(60, 200, generator=gen) > 0.5).double()  # more columns than rows: a tiny penalty is slow
    y = x @ torch.randn(200, generator=gen, dtype=torch.float64)
    rows = torch.ones(2, 60, dtype=torch.bool)
    strong, weak = torch.tensor([0.3], dtype=torch.float64), torch.tensor([1e-6], dtype=torch.float64)
    alone, _ = lasso_batch(x, y, rows[:1], strong)
    together, _ = lasso_batch(x, y, rows, torch.cat([strong, weak]))
    torch.testing.assert_close(together[0], alone[0], atol=1e-12, rtol=0)  # run on, it moves ~3e-8


def test_batched_fits_in_float32_stay_close_to_float64(monkeypatch):
    """A device without float64 (MPS) solves in float32: the same fits within 1e-4."""
    from pruneflow.methods import lasso as L

    gen = torch.Generator().manual_seed(2)
    x = (torch.rand(200, 40, generator=gen) > 0.5).double()
    y = x @ torch.rand(40, generator=gen, dtype=torch.float64) + 0.05 * torch.randn(200, generator=gen,
                                                                                    dtype=torch.float64)
    rows, penalties = torch.ones(2, 200, dtype=torch.bool), torch.tensor([1e-3, 1e-2], dtype=torch.float64)
    exact, _ = L.lasso_batch(x, y, rows, penalties)
    monkeypatch.setattr(L.R, "accum_dtype", lambda device: torch.float32)
    single, _ = L.lasso_batch(x, y, rows, penalties)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), exact, atol=1e-4, rtol=0)


def test_batched_sub_model_losses_equal_the_one_mask_per_forward_loop():
    model = tiny_causal_lm()
    spec = A.arch_for("llama")
    modules = bonsai.layout(model, spec, ("channels", "heads"), "query")
    total = modules[-1].start + modules[-1].count
    keep = torch.rand(6, total, generator=torch.Generator().manual_seed(0)) > 0.3
    keep[0] = True
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    batched = bonsai.submodel_losses(model, spec, modules, keep, windows, rows_per_forward=18)
    naive = bonsai.submodel_losses(model, spec, modules, keep, windows, rows_per_forward=3)
    torch.testing.assert_close(batched, naive, atol=1e-5, rtol=0)
    with torch.no_grad():
        dense = model(input_ids=windows, labels=windows).loss
    assert float(batched[0]) == pytest.approx(float(dense), abs=1e-5)  # the all-ones sub-model is the model
    assert len(set(batched.tolist())) == 6


def test_a_sub_models_loss_is_the_loss_of_the_model_with_its_dropped_units_zeroed():
    """Each layer drops different units: the masked sub-model's loss equals that of a copy whose dropped heads'
    o_proj columns and dropped channels' down_proj columns are zero (a layer mix-up in the masks shows)."""
    import copy

    model = tiny_causal_lm()
    spec = A.arch_for("llama")
    modules = bonsai.layout(model, spec, ("channels", "heads"), "query")
    total = modules[-1].start + modules[-1].count
    keep = torch.rand(3, total, generator=torch.Generator().manual_seed(4)) > 0.4
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(5))
    losses = bonsai.submodel_losses(model, spec, modules, keep, windows, rows_per_forward=9)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for k in range(3):
        zeroed = copy.deepcopy(model)
        for module in modules:
            dropped = (~keep[k, module.span]).nonzero().flatten().tolist()
            layer = zeroed.model.layers[module.layer]
            with torch.no_grad():
                for unit in dropped:
                    if module.kind == "heads":
                        layer.self_attn.o_proj.weight[:, unit * head_dim:(unit + 1) * head_dim] = 0
                    else:
                        layer.mlp.down_proj.weight[:, unit] = 0
        with torch.no_grad():
            expected = zeroed(input_ids=windows, labels=windows).loss
        assert float(losses[k]) == pytest.approx(float(expected), abs=1e-5)


def test_the_lasso_solution_meets_its_optimality_conditions():
    """1/(2n)‖y_c − X_c w‖² + λ‖w‖₁ at its minimum: the correlation g = X_cᵀ(y_c − X_c w)/n is λ·sign(w_j) where
    w_j ≠ 0 and at most λ where w_j = 0; above λ_max = max|X_cᵀ y_c|/n every weight is 0, below it some is not."""
    gen = torch.Generator().manual_seed(6)
    x = (torch.rand(150, 25, generator=gen) > 0.5).double()
    y = x @ torch.randn(25, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(150, generator=gen,
                                                                                    dtype=torch.float64)
    xc, yc = x - x.mean(0), y - y.mean()
    top = float((xc.T @ yc).abs().max()) / len(x)
    penalty = 0.1 * top
    weights, _ = lasso(x, y, penalty, max_iter=20000)
    g = xc.T @ (yc - xc @ weights) / len(x)
    active = weights != 0
    assert 0 < int(active.sum()) < 25
    torch.testing.assert_close(g[active], penalty * weights[active].sign(), atol=1e-6 * top, rtol=0)
    assert float(g[~active].abs().max()) <= penalty * (1 + 1e-6)
    assert bool((lasso(x, y, 1.01 * top)[0] == 0).all()) and bool((lasso(x, y, 0.9 * top)[0] != 0).any())


def test_data_that_agree_with_the_prior_leave_the_prior_untouched():
    """y = X·offset + c: δ = 0 is optimal at every penalty, so the fit is the offset itself, every column (a fit
    that regressed y instead of y − X·offset would come out near twice the offset)."""
    gen = torch.Generator().manual_seed(7)
    keep = (torch.rand(80, 12, generator=gen) > 0.5).double()
    offset = torch.linspace(0.1, 1.2, 12, dtype=torch.float64)
    fit = fit_cv(keep, keep @ offset + 3.0, folds=4, seed=0, offset=offset)
    torch.testing.assert_close(fit.weights, offset, atol=1e-12, rtol=0)


def test_group_units_mask_whole_kv_groups_and_scores_are_per_parameter():
    model = tiny_causal_lm()
    spec = A.arch_for("llama")
    modules = bonsai.layout(model, spec, ("channels", "heads"), "group")
    heads = [m for m in modules if m.kind == "heads"]
    assert [m.count for m in heads] == [2, 2] and heads[0].repeat == 2
    keep = torch.ones(1, modules[-1].start + modules[-1].count, dtype=torch.bool)
    keep[0, heads[0].start + 1] = False  # KV group 1 of layer 0
    candidates = bonsai.candidates_of(modules, keep)
    assert candidates.heads[0].tolist() == [[True, True, False, False]] and candidates.channels[1].shape == (1, 256)
    ranked = torch.arange(modules[-1].start + modules[-1].count, dtype=torch.float64)
    scores = bonsai._scores(model, spec, modules, ranked, record={})
    assert scores.comparable and scores.heads[0].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert math.isinf(bonsai._scores(model, spec, modules[1:], ranked, record={}).heads[0][0])  # unscored: kept


def test_shrinking_towards_the_prior_keeps_its_order_where_the_data_is_silent():
    gen = torch.Generator().manual_seed(0)
    keep = (torch.rand(80, 12, generator=gen) > 0.5).double()
    keep[:, 10:] = 1.0  # two units never dropped: the sub-models say nothing about them
    planted = torch.linspace(0.1, 1.2, 12, dtype=torch.float64)
    y = keep @ planted
    offset = torch.full((12,), 0.5, dtype=torch.float64)
    offset[10], offset[11] = 0.2, 0.9
    fit = fit_cv(keep, y, folds=4, seed=0, offset=offset)
    assert fit.weights[10] == 0.2 and fit.weights[11] == 0.9  # the offset, untouched
    assert kendall_tau(fit.weights[:10], planted[:10]) > 0.9
    plain = fit_cv(keep, y, folds=4, seed=0)
    assert plain.weights[10] == plain.weights[11] == 0.0  # shrunk to zero: a tie


def test_prior_baseline_scales_each_unit_type_to_the_objective():
    modules = [bonsai.Module(0, "heads", 0, 4, 10, 2), bonsai.Module(0, "channels", 4, 20, 1, 1)]
    gen = torch.Generator().manual_seed(0)
    priors = torch.rand(24, generator=gen).double() + 0.1
    candidates = torch.ones(24, dtype=torch.bool)
    keep = (torch.rand(60, 24, generator=gen) > 0.4).double()
    truth = torch.cat([3.0 * priors[:4], 0.5 * priors[4:]])
    baseline = bonsai.prior_baseline(modules, candidates, priors, keep, keep @ truth - 7.0)
    torch.testing.assert_close(baseline, truth)
