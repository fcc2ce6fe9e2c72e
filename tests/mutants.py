"""Shows that the tests written against restating the code fail for the right reason: each mutant changes one
production line the way a plausible bug would, runs the test that guards it (it must fail), and restores the
file. Not part of the suite (it edits the checkout); run it by hand: ``python tests/mutants.py [NAME ...]``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (file, the production text, the mutant, the test that must fail on it)
MUTANTS = {
    "ridge-without-prior": ("pruneflow/units/reconstruct.py", "rhs = self.xy + damp * w0.T", "rhs = self.xy",
                            "tests/pipeline/test_reconstruct.py::test_the_gram_solve_is_the_ridge_fit_pulled_towards_the_prior"),
    "ridge-absolute-damping": ("pruneflow/units/reconstruct.py", "damp = DAMPING * scale", "damp = DAMPING",
                               "tests/pipeline/test_reconstruct.py::test_the_gram_solve_is_the_ridge_fit_pulled_towards_the_prior"),
    "search-keeps-worse": ("pruneflow/selection/search.py", "if best[0] < parent_loss:", "if best[0] > parent_loss:",
                           "tests/pipeline/test_search.py::test_search_keeps_the_exact_ratio_and_never_loses_to_its_start"),
    "lasso-ignores-the-prior": ("pruneflow/methods/lasso.py", "residual = y - x @ offset", "residual = y",
                                "tests/unit/test_bonsai_parts.py::test_data_that_agree_with_the_prior_leave_the_prior_untouched"),
    "perplexity-counts-windows": ("pruneflow/evaluation/evaluate.py", "total_tokens += nll.numel()", "total_tokens += len(nll)",
                                  "tests/pipeline/test_perplexity.py"),
    "gates-any-passes": ("pruneflow/pipeline/stages.py",
                         'metrics["gates_passed"] = all(g["passed"] for g in metrics["gates"].values())',
                         'metrics["gates_passed"] = any(g["passed"] for g in metrics["gates"].values())',
                         "tests/pipeline/test_stages.py::test_the_stages_run_in_order_and_write_their_outputs"),
    "lasso-uncentred-gradient": ("pruneflow/methods/lasso.py",
                                 "gradient = (residual @ x - residual.sum(1, keepdim=True) * x_mean) / counts[:, None]",
                                 "gradient = residual @ x / counts[:, None]",
                                 "tests/unit/test_bonsai_parts.py::"
                                 "test_lasso_without_penalty_solves_least_squares_and_ignores_constant_columns"),
    "lasso-shared-convergence": ("pruneflow/methods/lasso.py", "running = active[:, None]",
                                 "running = torch.ones_like(active)[:, None]",
                                 "tests/unit/test_bonsai_parts.py::test_batched_fits_stop_each_at_its_own_convergence"),
    "flap-unsquared-attention": ("pruneflow/methods/flap.py", "fluctuation(weight, stats.var) ** 2)",
                                 "fluctuation(weight, stats.var))",
                                 "tests/unit/test_scores.py::test_flap_ranks_heads_by_the_squared_attention_metric_on_a_planted_case"),
    "cpu-accumulates-float32": ("pruneflow/execution/runtime.py",
                                'return torch.float32 if device.type == "mps" else torch.float64',
                                "return torch.float32",
                                "tests/unit/test_runtime.py::test_cpu_statistics_keep_a_small_variance_under_a_large_mean"),
    "mps-accumulates-float64": ("pruneflow/execution/runtime.py",
                                'return torch.float32 if device.type == "mps" else torch.float64',
                                "return torch.float64",
                                "tests/pipeline/test_no_float64_device.py"),
    "search-float64-on-device": ("pruneflow/selection/search.py",
                                 "losses.append(float(token_nll(model, windows.to(device)).cpu().double().mean()))",
                                 "losses.append(float(token_nll(model, windows.to(device)).double().mean()))",
                                 "tests/pipeline/test_no_float64_device.py"),
    "perplexity-float64-on-device": ("pruneflow/evaluation/evaluate.py", "total_nll += nll.cpu().double().sum().item()",
                                     "total_nll += nll.double().sum().item()",
                                     "tests/pipeline/test_no_float64_device.py::test_perplexity_runs_without_float64_on_the_device"),
}


def run(name: str) -> bool:
    """Whether the guarding test fails on the mutant (the file is restored either way)."""
    file, original, mutant, test = MUTANTS[name]
    path = ROOT / file
    source = path.read_text()
    if source.count(original) != 1:
        raise SystemExit(f"{name}: the production text is not in {file} exactly once; update this table")
    path.write_text(source.replace(original, mutant))
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
                              cwd=ROOT, capture_output=True, text=True)
    finally:
        path.write_text(source)
    return proc.returncode == 1


def main(names: list[str]) -> int:
    names = names or list(MUTANTS)
    tests = sorted({MUTANTS[name][3] for name in names})
    if subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                      capture_output=True).returncode != 0:
        raise SystemExit("the guarding tests fail without any mutant: fix them first")
    survived = []
    for name in names:
        killed = run(name)
        print(f"{name:32s} {'killed' if killed else 'SURVIVED'}", flush=True)
        if not killed:
            survived.append(name)
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
