"""Services failing: a dead Prefect API is a clear error before any work; a push that failed is completed by
the next run, nothing lost locally. (MLflow down and S3 rejecting credentials: tests/integration/test_stack.py;
a run without any server: tests/pipeline/test_flow.py.)"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.stack import free_port
from tests.conftest import sh


def test_prefect_api_down_is_a_clear_error_before_any_work(project):
    dead = f"http://127.0.0.1:{free_port()}/api"
    started = time.monotonic()
    proc = subprocess.run([str(Path(sys.executable).parent / "pruneflow"), "run", "--params",
                           str(project / "params.yaml")], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "PREFECT_API_URL": dead}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"Prefect API {dead} is unreachable after 3 attempts" in proc.stderr
    assert "Traceback" not in proc.stderr and not (project / "artifacts").exists()
    assert time.monotonic() - started < 60  # bounded: 3 attempts with 1 s, 2 s backoff


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_a_failed_push_is_completed_by_the_next_run(prefect_api, project, tmp_path, monkeypatch):
    from flows.pipeline import pipeline
    from pruneflow.params import load_params
    from tasks import remote
    from tasks.stage import dvc_bin

    monkeypatch.setattr(remote.push, "retry_delay_seconds", [0, 0, 0])  # the same 3 retries, without the waits
    dvc = dvc_bin()
    sh([dvc, "remote", "add", "-d", "store", "/proc/pruneflow-remote"], project)  # nothing can be written there
    sh(["git", "commit", "-qam", "remote"], project)
    params = load_params(project / "params.yaml")
    with pytest.raises(Exception, match="dvc push failed"):
        pipeline(params=params, repo=str(project), run_name="push-fails")
    assert (project / "artifacts" / "recovered" / "model.safetensors").exists()  # outputs kept locally
    store = tmp_path / "store"
    sh([dvc, "remote", "modify", "store", "url", str(store)], project)
    again = pipeline(params=params, repo=str(project), run_name="push-again")
    assert all(s["cached"] for s in again["stages"])  # nothing recomputed
    assert again["pushed_to"] == str(store) and any(store.rglob("*"))
    status = subprocess.run([dvc, "status", "--cloud"], cwd=project, capture_output=True, text=True)
    assert status.returncode == 0 and "in sync" in status.stdout.lower(), status.stdout
