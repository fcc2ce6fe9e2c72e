"""Candidates fanned out over Ray workers give the plans of ``--workers local``, also when a worker dies.

One local Ray instance (2 CPUs, token authentication as Ray sets it) for the module; every test here runs on
one xdist worker, so the machine never hosts two Ray instances.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from typer.testing import CliRunner

from pruneflow.model import arch as A
from pruneflow.model import checkpoint
from pruneflow.errors import PruneflowError
from pruneflow.execution import replicas
from pruneflow.methods.options import BonsaiParams
from pruneflow.pipeline.params import PruneParams
from pruneflow.prune import prune
from pruneflow.execution.runtime import Runtime
from tests.conftest import tiny_causal_lm, tiny_moe

pytestmark = pytest.mark.xdist_group("ray")

WINDOWS = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(0))
FAST = BonsaiParams(preset="fast", sub_models=8, n_windows=4, rows_per_forward=8)
SEARCH = {"budget": 9, "windows": 4, "offspring": 4, "seed": 1}
CASES = {
    "bonsai": (PruneParams(ratio=0.3), FAST),
    "search": (PruneParams(ratio=0.3, allocation="search", search=SEARCH), None),
    "sleb": (PruneParams(ratio=0.4, units=["layers"]), None),
    # calibration statistics: windows split over the workers, their partial sums added in window order
    "flap": (PruneParams(ratio=0.3, allocation="global"), None),
    "block_influence": (PruneParams(ratio=0.4, units=["layers"]), None),
    "expert_drop": (PruneParams(ratio=0.3), None),
}


@pytest.fixture(scope="module")
def ray_workers():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield Runtime.create("cpu", workers="2")
    finally:
        replicas.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("workers") / "dense"
    tiny_causal_lm(num_hidden_layers=4).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved_moe(tmp_path_factory):
    path = tmp_path_factory.mktemp("workers") / "moe"
    tiny_moe(num_hidden_layers=2).save_pretrained(path)
    return path


def _plan(path, method, runtime):
    cfg, options = CASES[method]
    model, _, spec = checkpoint.load(path, runtime, with_tokenizer=False)
    scorer = "flap" if method == "search" else method
    return prune(model, spec, scorer, cfg, WINDOWS, seed=3, options=options, runtime=runtime)


@pytest.mark.parametrize("method", list(CASES))
def test_plans_on_two_workers_equal_local(ray_workers, saved, saved_moe, method, monkeypatch):
    path = saved_moe if method == "expert_drop" else saved
    local = _plan(path, method, Runtime.create("cpu"))
    real, shares = replicas.Pool.statistics, []

    def statistics(self, lineage, windows, *args, **kwargs):
        shares.append(len(windows))
        return real(self, lineage, windows, *args, **kwargs)

    monkeypatch.setattr(replicas.Pool, "statistics", statistics)
    fanned = _plan(path, method, ray_workers)
    assert fanned.plan.to_json() == local.plan.to_json()
    assert bool(shares) == (method != "sleb")  # their calibration statistics went to the workers (SLEB has none)
    if method == "bonsai":  # each iteration's sub-model losses exactly (the lasso's last bits vary run to run)
        losses = [[(it["loss_min"], it["loss_max"]) for it in r.iterations] for r in (local, fanned)]
        assert losses[0] == losses[1] and len(losses[0]) > 1


def test_losses_equal_local_bit_for_bit_and_workers_rebuild_the_pruned_model(ray_workers, saved):
    from pruneflow.execution import passes
    from pruneflow.execution.candidates import Candidates

    results = []
    for runtime in (Runtime.create("cpu"), ray_workers):
        model, _, spec = checkpoint.load(saved, runtime, with_tokenizer=False)
        first = prune(model, spec, "sleb", PruneParams(ratio=0.2, units=["layers"]), WINDOWS, runtime=runtime)
        assert len(A.blocks(model, spec)) == 3  # pruned in place: the workers must replay this plan
        candidates = Candidates.of_blocks([set(), {0}, {1}, {2}, {0, 2}], 3)
        measured = [passes.losses(model, spec, WINDOWS, candidates, runtime, 5,
                                  objective=passes.objective(model, spec, WINDOWS, runtime, kind))
                    for kind in ("loss", "kl", "hidden")]  # the objective's reference travels to the workers
        results.append((first.plan.to_json(), measured))
    assert results[0][0] == results[1][0]
    for local, fanned in zip(results[0][1], results[1][1]):
        assert torch.equal(local, fanned)


def test_a_worker_that_cannot_load_the_model_is_a_clear_error(ray_workers, saved, tmp_path):
    """The driver's model directory gone from where the workers look: an error naming it, not a Ray traceback."""
    import shutil

    from pruneflow.execution import passes
    from pruneflow.execution.candidates import Candidates

    moved = tmp_path / "elsewhere"
    shutil.copytree(saved, moved)
    model, _, spec = checkpoint.load(moved, ray_workers, with_tokenizer=False)
    shutil.rmtree(moved)  # loaded here; no node can read it any more
    with pytest.raises(PruneflowError, match=r"a worker could not .*the model directory .*elsewhere is not there"):
        passes.losses(model, spec, WINDOWS, Candidates.of_blocks([set(), {0}], 4), ray_workers, 4)


def test_a_worker_killed_mid_run_is_restarted_and_the_plan_is_the_same(ray_workers, saved, monkeypatch):
    """The first worker's process is killed (SIGKILL) before the search's second generation: Ray restarts it,
    the fresh replica rebuilds the model from the lineage the call carries, and the plan is unchanged."""
    import ray

    local = _plan(saved, "search", Runtime.create("cpu"))
    pool = replicas.pool_for(ray_workers)
    real, calls, killed = replicas.Pool.batch_sums, [], []

    def batch_sums(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            pid = ray.get(self.actors[0].pid.remote())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(replicas.Pool, "batch_sums", batch_sums)
    fanned = _plan(saved, "search", ray_workers)
    assert killed and ray.get(pool.actors[0].pid.remote()) != killed[0]  # a new process
    assert len(calls) >= 3 and fanned.plan.to_json() == local.plan.to_json()


def test_bad_workers_are_clear_errors_before_any_work(tmp_path, saved):
    from pruneflow.cli import app

    with pytest.raises(PruneflowError, match="--workers .two.: use local"):
        Runtime.create("cpu", workers="two")
    result = CliRunner().invoke(app, ["prune", str(saved), "--out", str(tmp_path / "out"), "--method", "sleb",
                                      "--units", "layers", "--ratio", "0.3", "--workers", "lots"])
    assert result.exit_code == 2 and "runtime.workers" in result.output and not (tmp_path / "out").exists()


def test_an_unreachable_cluster_is_a_clear_error(tmp_path, saved):
    import socket

    from pruneflow.cli import app

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = CliRunner().invoke(app, ["prune", str(saved), "--out", str(tmp_path / "out"), "--method", "sleb",
                                      "--units", "layers", "--ratio", "0.3", "--workers", f"ray://127.0.0.1:{port}"])
    assert result.exit_code == 2 and f"nothing answers at 127.0.0.1:{port}" in result.output
    assert not (tmp_path / "out").exists() and "loading" not in result.output  # before the model is read


def test_a_head_that_fails_to_start_a_client_server_is_tried_again_and_nothing_else_is(monkeypatch):
    """Ray Client's head refusing a connection because its per-client server died at start (the words Ray's
    proxier sends) is retried with a fresh connection; a timeout (no head, a wrong token) is not."""
    import ray

    refused = ConnectionAbortedError("Initialization failure from server:\nTraceback (most recent call last):\n"
                                     "RuntimeError: Starting Ray client server failed. See "
                                     "ray_client_server_23000.err for detailed logs.\n")
    calls = []

    def init(outcomes):
        def fake(**kwargs):
            calls.append(kwargs)
            outcome = outcomes.pop(0)
            if outcome is not None:
                raise outcome
        return fake

    monkeypatch.setattr(ray, "init", init([refused, None]))
    replicas.connect("ray://head:10001", what="--workers ray://head:10001", wait=0)
    assert [c["address"] for c in calls] == ["ray://head:10001"] * 2

    calls.clear()
    monkeypatch.setattr(ray, "init", init([refused] * 3))
    with pytest.raises(PruneflowError, match="could not start a server for this client \\(3 tries\\)"):
        replicas.connect("ray://head:10001", wait=0)
    assert len(calls) == 3

    calls.clear()
    monkeypatch.setattr(ray, "init", init([ConnectionError("ray client connection timeout"), None]))
    with pytest.raises(PruneflowError, match="cannot reach Ray at ray://head:10001: ray client connection timeout"):
        replicas.connect("ray://head:10001", wait=0)
    assert len(calls) == 1


def test_workers_without_ray_installed_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(PruneflowError, match="needs Ray, which is not installed"):
        Runtime.create("cpu", workers="2")


def test_calibration_statistics_on_workers_are_the_local_sums(ray_workers, saved):
    """FLAP's per-channel scores from two workers' partial sums equal one process's to float64 rounding."""
    from pruneflow.methods import SCORERS

    scores = []
    for runtime in (Runtime.create("cpu"), ray_workers):
        model, _, spec = checkpoint.load(saved, runtime, with_tokenizer=False)
        scores.append(SCORERS["flap"](model, spec, WINDOWS, runtime))
    for local, fanned in zip(scores[0].channels + scores[0].heads, scores[1].channels + scores[1].heads):
        torch.testing.assert_close(fanned, local, rtol=1e-6, atol=0)
        assert not torch.equal(local, torch.zeros_like(local))


def test_partial_statistics_add_item_by_item():
    from pruneflow.execution.stats import InputStats

    a = [InputStats(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]), 2), None, 3.0]
    b = [InputStats(torch.tensor([3.0, 1.0]), torch.tensor([9.0, 1.0]), 1), InputStats(torch.ones(2), torch.ones(2), 1), 4.0]
    total = replicas.add([], replicas.add(a, b))  # an empty list (a worker that saw no block) takes the other
    assert torch.equal(total[0].total, torch.tensor([4.0, 3.0])) and total[0].count == 3
    assert total[1].count == 1 and total[2] == 7.0
    with pytest.raises(ValueError, match="different lengths"):
        replicas.add([1, 2], [1])
    with pytest.raises(ValueError, match="disagree"):
        replicas.add({"dtype": torch.float32}, {"dtype": torch.float64})


def test_statistics_come_back_where_the_hooks_kept_them():
    """A sum a worker kept on its accelerator goes onto the driver's device; one kept on the CPU (expert_drop's
    per-combination losses) stays on the CPU. The meta device stands in for an accelerator here."""
    from pruneflow.execution.stats import InputStats

    marked = replicas._OnDevice(torch.ones(3))
    parts = [[InputStats(marked, replicas._OnDevice(torch.ones(3)), 2), torch.zeros(2)],
             [InputStats(replicas._OnDevice(torch.ones(3)), replicas._OnDevice(torch.ones(3)), 1), torch.ones(2)]]
    total = replicas.add(*parts)
    home = replicas._map(total, lambda t: t.tensor.to("meta") if isinstance(t, replicas._OnDevice) else t)
    assert home[0].total.device.type == "meta" and home[0].count == 3
    assert home[1].device.type == "cpu" and torch.equal(home[1], torch.ones(2))
    assert torch.equal(replicas.add(*parts)[0].total.tensor, torch.full((3,), 2.0))
