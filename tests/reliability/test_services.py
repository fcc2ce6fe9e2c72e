"""Services failing: a dead Prefect API is a clear error before any work; a Prefect server that dies mid-run
loses no finished stage; S3 stopped mid-push loses nothing and the next run completes the push. (MLflow down and S3 rejecting credentials: tests/integration/test_stack.py;
a run without any server: tests/pipeline/test_flow.py.)"""

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pruneflow.infra.stack import free_port
from tests.conftest import dvc_up_to_date, sh
from tests.integration.test_deployments import api


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


@pytest.mark.integration
def test_the_prefect_server_dying_mid_run_loses_no_finished_stage(project, tmp_path, monkeypatch):
    """The server is killed (SIGKILL) while the stages run. Stages report through Prefect's events (which only
    warn), so they go on; the first API call that must answer fails after the client's bounded retries: the run
    exits 2 with an error naming the API, at once (no minutes of draining events to a dead server). Restarted,
    the next run recomputes nothing and finishes with the same metrics."""
    from pruneflow.infra import stack
    from tests.conftest import KEY, SECRET

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)  # the stack's service table wants them; Prefect does not
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    run_dir, state, port = tmp_path / "prefect-server", {}, free_port()

    def start_prefect():
        stack.start(stack.services(run_dir, {"s3": 0, "mlflow": 0, "prefect": port})[2], run_dir, state)

    start_prefect()
    api_url = f"http://127.0.0.1:{port}/api"
    # the client's own retries (default 5, exponential backoff: ~70 s measured) cut to 2 for the test's time
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_CLIENT_MAX_RETRIES": "2"}
    cli = [str(Path(sys.executable).parent / "pruneflow"), "run", "--name"]
    try:
        with open(tmp_path / "run.log", "w") as log:
            proc = subprocess.Popen(cli + ["dies"], cwd=project, stdout=log, stderr=subprocess.STDOUT, env=env)
            lock = project / "dvc.lock"
            deadline = time.monotonic() + 300
            while not (lock.exists() and "\n  score:" in lock.read_text()) and proc.poll() is None:
                assert time.monotonic() < deadline, "the score stage did not finish in 300 s"
                time.sleep(0.2)
            os.killpg(state["prefect"]["pid"], signal.SIGKILL)  # mid-run: prune, recover, evaluate still to come
            killed = time.monotonic()
            assert proc.wait(300) == 2
        lost = time.monotonic() - killed
        output = (tmp_path / "run.log").read_text()
        assert "error: the Prefect API stopped answering during the run" in output and f"127.0.0.1:{port}" in output
        assert lost < 120  # the client's bounded retries, then out at once
        metrics = (project / "artifacts" / "metrics.json").read_text()  # every stage finished meanwhile
        start_prefect()
        again = subprocess.run(cli + ["again"], cwd=project, capture_output=True, text=True, env=env, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert ("again: source (cached), calibrate (cached), score (cached), prune (cached), recover (cached), "
                "evaluate (cached)" in again.stderr)
        assert (project / "artifacts" / "metrics.json").read_text() == metrics
        # the restarted server showed the dead run as Running; the next run marked it Crashed
        assert "marked 1 flow run(s) whose process had ended as Crashed" in again.stderr
        states = {r["parameters"]["run_name"]: r["state_type"] for r in api(env, "/flow_runs/filter", {})}
        assert states == {"dies": "CRASHED", "again": "COMPLETED"}
    finally:
        stack.down(run_dir)


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


class CuttingProxy:
    """A TCP proxy in front of an S3 port: once ``limit`` request bytes went through it calls ``trip`` (which
    stops the server mid-transfer); it forwards to whatever listens upstream, and refuses while nothing does."""

    def __init__(self, upstream: int):
        self.upstream, self.sent, self.limit, self.trip = upstream, 0, None, None
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for src, dst, request in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, request), daemon=True).start()

    def _pump(self, src, dst, request):
        try:
            while data := src.recv(65536):
                if request and self.limit is not None:
                    self.sent += len(data)
                    if self.sent > self.limit:
                        self.limit = None
                        self.trip()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.mark.integration
def test_s3_stopped_mid_push_loses_nothing_and_the_next_run_completes_the_push(
        prefect_api, project, tmp_path, monkeypatch):
    """SeaweedFS is killed (SIGKILL) after ~300 KB of the push went out: the push fails after its bounded
    retries with the remote named, every output stays local, and after a restart the next run recomputes
    nothing, completes the push, and a `dvc pull` into an empty cache restores identical files."""
    import boto3

    from pruneflow.flows.pipeline import pipeline
    from pruneflow.infra import stack
    from pruneflow.pipeline.params import load_params
    from pruneflow.tasks import remote
    from pruneflow.tasks.stage import dvc_bin
    from tests.conftest import KEY, SECRET

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setattr(remote.push, "retry_delay_seconds", [0, 0, 0])  # the same 3 retries, without the waits
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # and fewer of botocore's own (default 5: ~3 min to fail, not 1)
    run_dir, state, port = tmp_path / "s3", {}, free_port()

    def start_s3():
        stack.start(stack.services(run_dir, {"s3": port, "mlflow": 0, "prefect": 0})[0], run_dir, state)

    start_s3()
    stack.create_buckets(state["s3"]["url"])
    proxy = CuttingProxy(port)
    proxy.trip = lambda: os.killpg(state["s3"]["pid"], signal.SIGKILL)
    try:
        dvc = dvc_bin()
        sh([dvc, "remote", "add", "-d", "store", "s3://dvc/mid-push"], project)
        sh([dvc, "remote", "modify", "--local", "store", "endpointurl", proxy.url], project)
        sh(["git", "commit", "-qam", "remote"], project)
        params = load_params(project / "params.yaml")
        proxy.limit = 300_000
        with pytest.raises(Exception, match="dvc push failed"):
            pipeline(params=params, repo=str(project), run_name="s3-dies")
        assert proxy.limit is None and not stack._alive(state["s3"]["pid"])  # it died during the push
        objects = [p for p in (project / ".dvc" / "cache" / "files").rglob("*") if p.is_file()]  # what push sends
        assert sum(p.stat().st_size for p in objects) > 3 * 300_000  # so the cut really was mid-push

        def digests():
            return {p.relative_to(project): hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in sorted((project / "artifacts").rglob("*"))  # resources/: each run's own timings
                    if p.is_file() and ".state" not in p.parts and "resources" not in p.parts}

        local = digests()
        assert dvc_up_to_date(subprocess.run([dvc, "status"], cwd=project, capture_output=True,
                                             text=True).stdout)  # nothing lost locally
        start_s3()  # back, on the same data directory
        s3 = boto3.session.Session().client("s3", endpoint_url=state["s3"]["url"], region_name="us-east-1")
        partial = s3.list_objects_v2(Bucket="dvc", Prefix="mid-push/").get("KeyCount", 0)
        assert partial < len(objects), (partial, len(objects))  # cut short (measured: 13 of 29 objects there)
        again = pipeline(params=params, repo=str(project), run_name="s3-back")
        assert all(s["cached"] for s in again["stages"] if s["stage"] != "source")  # nothing recomputed
        assert again["pushed_to"] == "s3://dvc/mid-push"
        status = subprocess.run([dvc, "status", "--cloud"], cwd=project, capture_output=True, text=True)
        assert status.returncode == 0 and "in sync" in status.stdout.lower(), status.stdout
        for name in ("calibration", "scores", "model", "recovered"):
            shutil.rmtree(project / "artifacts" / name)
        shutil.rmtree(project / ".dvc" / "cache")
        sh([dvc, "pull"], project)  # no object that the cut left half-written can come back
        assert digests() == local and len(local) > 5
    finally:
        proxy.server.close()
        stack.down(run_dir)
