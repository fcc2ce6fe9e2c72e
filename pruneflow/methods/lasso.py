"""L1-penalised linear regression with the penalty chosen by k-fold cross-validated rank correlation.

Bonsai fits y ≈ w·mask + b over sub-model evaluations; ``w`` is each unit's estimated importance. The design
has far more columns than rows (hundreds of candidate units, ~200 sub-models), hence the L1 penalty; it is
chosen by how well held-out sub-models are *ranked* (Kendall τ), which is what selection needs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from pruneflow.execution import runtime as R  # R.accum_dtype: float64, float32 on MPS (looked up at call time)

log = logging.getLogger(__name__)


@dataclass
class LassoFit:
    weights: torch.Tensor  # (P,) one coefficient per column
    intercept: float
    penalty: float  # the chosen L1 strength
    cv_tau: float  # mean held-out Kendall τ at that strength
    cv_table: dict[float, float]  # every strength tried → its mean held-out τ


def lasso(x: torch.Tensor, y: torch.Tensor, penalty: float, max_iter: int = 3000,
          tol: float | None = None) -> tuple[torch.Tensor, float]:
    """Minimise 1/(2n)·‖y − x·w − b‖² + penalty·‖w‖₁ by FISTA (accelerated proximal gradient).

    x: (n, P), y: (n,), on any device. Returns (w (P,), b). Columns without variance get w = 0.
    """
    weights, intercepts = lasso_batch(x, y, torch.ones(1, len(y), dtype=torch.bool),
                                      torch.tensor([penalty], dtype=torch.float64), max_iter, tol)
    return weights[0], float(intercepts[0])


def lasso_batch(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, penalties: torch.Tensor,
                max_iter: int = 3000, tol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """F lasso fits at once on one design: fit f uses the rows ``rows[f]`` (F, n) and the penalty
    ``penalties[f]``. Each FISTA step reads the design twice for all fits together (W·Xᵀ, R·X) instead of
    twice per fit, and each fit stops at its own convergence, as it would alone. Computes on x's device in
    float64, or float32 where the device has no float64 (MPS; ``tol`` then defaults to 1e-6 instead of 1e-10).

    Returns (W (F, P), b (F,)) in the compute dtype.
    """
    device = x.device
    dtype = R.accum_dtype(device)
    tol = tol if tol is not None else (1e-6 if dtype == torch.float32 else 1e-10)
    x, y = x.to(dtype), y.to(dtype).to(device)  # converted where they are, then moved: MPS holds no float64
    mask = rows.to(dtype).to(device)  # (F, n)
    counts = mask.sum(1)  # (F,)
    x_mean = (mask @ x) / counts[:, None]  # (F, P)
    y_mean = (mask @ y) / counts  # (F,)
    yc = mask * (y[None] - y_mean[:, None])  # (F, n), zero outside each fit's rows
    lipschitz = _squared_spectral_norms(x, mask, x_mean) / counts  # (F,)
    active = lipschitz > 0  # a fit whose columns have no variance: w = 0, b = its mean
    inverse = torch.where(active, 1 / lipschitz.clamp(min=torch.finfo(dtype).tiny), 0.0)[:, None]  # (F, 1)
    thresholds = penalties.to(dtype).to(device)[:, None] * inverse  # (F, 1)
    # (F, P) whether a column takes more than one value on a fit's rows: the others get w = 0 exactly (their
    # gradient, Σ r·(x − μ), is zero but for rounding, which depends on how the BLAS orders the sums)
    varying = torch.stack([(x[r] != x[r][:1]).any(0) for r in rows.to(device)])
    weights = torch.zeros(len(mask), x.shape[1], dtype=dtype, device=x.device)  # (F, P)
    momentum, step = weights.clone(), 1.0
    for iteration in range(max_iter):
        residual = mask * (momentum @ x.T - (momentum * x_mean).sum(1, keepdim=True)) - yc  # (F, n) (X − 1μᵀ)w − yc
        # (X − 1μᵀ)ᵀ r / n: r sums to 0, so the μ term only cancels rounding
        gradient = torch.where(varying, residual @ x - residual.sum(1, keepdim=True) * x_mean, 0.0) / counts[:, None]
        shrunk = momentum - gradient * inverse
        updated = shrunk.sign() * (shrunk.abs() - thresholds).clamp(min=0)
        next_step = (1 + math.sqrt(1 + 4 * step * step)) / 2
        running = active[:, None]  # a finished fit keeps its weights and momentum
        momentum = torch.where(running, updated + (step - 1) / next_step * (updated - weights), momentum)
        change = (updated - weights).abs().amax(1)  # (F,)
        weights, step = torch.where(running, updated, weights), next_step
        active = active & (change > tol * (1 + weights.abs().amax(1)))
        if iteration % 16 == 15 and not bool(active.any()):  # a host sync every 16 steps, not every step
            break
    return weights, y_mean - (x_mean * weights).sum(1)


def _squared_spectral_norms(x: torch.Tensor, mask: torch.Tensor, x_mean: torch.Tensor) -> torch.Tensor:
    """(F,) ‖X_f − 1·μ_fᵀ‖₂² of each fit's centred rows, from the smaller of its two Gram matrices."""
    n, p = x.shape
    rows_gram = x @ x.T if n <= p else None  # (n, n), shared by every fit
    norms = []
    for m, mu in zip(mask, x_mean):
        if rows_gram is not None:  # (n, n): D (X − 1μᵀ)(X − 1μᵀ)ᵀ D
            projected = x @ mu  # (n,)
            centred = rows_gram - projected[:, None] - projected[None, :] + mu @ mu
            gram = centred * m[:, None] * m[None, :]
        else:  # (P, P): Xᵀ D X − n_f μ μᵀ
            gram = (x * m[:, None]).T @ x - m.sum() * torch.outer(mu, mu)
        norms.append(torch.linalg.eigvalsh(gram)[-1].clamp(min=0))
    return torch.stack(norms)


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kendall's τ-b between two (n,) vectors (0 when either is constant)."""
    da = (a[:, None] - a[None, :]).sign()
    db = (b[:, None] - b[None, :]).sign()
    denominator = math.sqrt(float((da != 0).sum()) * float((db != 0).sum()))
    return float((da * db).sum()) / denominator if denominator else 0.0


def penalty_grid(x: torch.Tensor, y: torch.Tensor, count: int = 8) -> list[float]:
    """From half the strength that zeroes every weight down to 1e-4 of it, geometrically, then no penalty."""
    xc, yc = x.double() - x.double().mean(0), y.double() - y.double().mean()
    top = float((xc.T @ yc).abs().max()) / x.shape[0]
    if top == 0:
        return [0.0]
    return [top * 0.5 * (2e-4) ** (i / (count - 1)) for i in range(count)] + [0.0]


def fit_cv(x: torch.Tensor, y: torch.Tensor, folds: int = 5, seed: int = 0,
           offset: torch.Tensor | None = None, device: torch.device | str = "cpu") -> LassoFit:
    """Choose the L1 strength by ``folds``-fold cross-validated Kendall τ, then refit on all rows.

    Every penalty × fold is one fit of a single batched solve on ``device`` (:func:`lasso_batch`). With
    ``offset`` (P,), the weights are ``offset + δ`` and the penalty shrinks δ: towards the offset, not 0.
    Returns CPU float64 tensors.
    """
    started = time.perf_counter()
    x, y = x.double(), y.double()
    offset = torch.zeros(x.shape[1], dtype=torch.float64) if offset is None else offset.double()
    residual = y - x @ offset
    n = x.shape[0]
    folds = max(2, min(folds, n // 2))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = order.chunk(folds)
    penalties = penalty_grid(x, residual)
    train = torch.ones(len(penalties) * folds, n, dtype=torch.bool)  # fit (penalty i, fold j) = row i·folds + j
    for fit, held in enumerate(parts * len(penalties)):
        train[fit, held] = False
    on_device = x.to(R.accum_dtype(torch.device(device))).to(device)
    deltas, intercepts = lasso_batch(on_device, residual, train,
                                     torch.tensor(penalties, dtype=torch.float64).repeat_interleave(folds))
    deltas, intercepts = deltas.cpu().double(), intercepts.cpu().double()
    table: dict[float, float] = {}
    for i, penalty in enumerate(penalties):
        taus = [kendall_tau(x[held] @ (offset + deltas[i * folds + j]) + intercepts[i * folds + j], y[held])
                for j, held in enumerate(parts)]
        table[penalty] = sum(taus) / len(taus)
    best = max(table, key=lambda p: (round(table[p], 12), p))  # ties: the stronger penalty
    delta, intercept = lasso(on_device, residual, best)
    log.info("lasso: %d columns × %d rows, %d penalties × %d folds + 1 fits on %s in %.2f s", x.shape[1], n,
             len(penalties), folds, on_device.device, time.perf_counter() - started)
    return LassoFit(weights=offset + delta.cpu().double(), intercept=intercept, penalty=best, cv_tau=table[best],
                    cv_table=table)
