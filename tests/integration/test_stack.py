"""`pruneflow up | status | down`: the real local stack (SeaweedFS, MLflow server, Prefect server) on free ports."""

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import KEY, SECRET
from tests.integration.test_deployments import api
from tests.pipeline.test_cli import run

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("stack")]  # one worker starts the stack


def test_status_reports_every_service_healthy_and_nothing_secret_is_written(stack):
    run_dir, state = stack
    result = run("status", "--run-dir", run_dir)
    assert result.exit_code == 0, result.output
    assert sorted(state) == ["mlflow", "prefect", "s3"]
    assert all(s["url"].startswith("http://127.0.0.1:") for s in state.values())
    assert all(f"{s['url']} " in result.output for s in state.values()), result.output  # whole, never cut
    assert result.output.count("healthy") == 3

    written = "".join(p.read_text(errors="ignore") for p in run_dir.rglob("*")
                      if p.is_file() and p.stat().st_size < 5_000_000 and p.name != "s3.json")
    assert SECRET not in written  # only the identities file (0600) holds it
    assert oct((run_dir / "seaweedfs" / "s3.json").stat().st_mode)[-3:] == "600"


def test_the_prefect_ui_is_told_the_api_of_the_port_it_runs_on(stack):
    """The UI reads its API's address from /ui-settings; on a non-default port it used to say 4200."""
    import json
    import urllib.request

    url = stack[1]["prefect"]["url"]
    settings = json.loads(urllib.request.urlopen(f"{url}/ui-settings", timeout=10).read())
    assert settings["api_url"] == f"{url}/api"


def test_s3_refuses_anonymous_and_wrong_key_requests(stack):
    import boto3
    from botocore.exceptions import ClientError

    url = stack[1]["s3"]["url"]
    good = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=KEY,
                        aws_secret_access_key=SECRET)
    assert {"dvc", "mlflow"} <= {b["Name"] for b in good.list_buckets()["Buckets"]}
    good.put_object(Bucket="dvc", Key="probe", Body=b"x")
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"{url}/dvc/probe", timeout=5)
    assert anonymous.value.code == 403
    wrong = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=KEY,
                         aws_secret_access_key="not-the-secret")
    with pytest.raises(ClientError):
        wrong.list_buckets()


def test_mlflow_server_proxies_artifacts_to_s3(stack, tmp_path):
    import boto3
    from mlflow import MlflowClient

    state = stack[1]
    client = MlflowClient(state["mlflow"]["url"])
    run_ = client.create_run(client.create_experiment("stack-test"))
    (tmp_path / "note.txt").write_text("hello")
    client.log_artifact(run_.info.run_id, str(tmp_path / "note.txt"))
    s3 = boto3.client("s3", endpoint_url=state["s3"]["url"], region_name="us-east-1", aws_access_key_id=KEY,
                      aws_secret_access_key=SECRET)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(k.endswith("note.txt") for k in keys)


def test_a_taken_port_is_a_clear_error_and_a_second_up_is_refused(stack):
    run_dir, state = stack
    taken = run("up", "--run-dir", run_dir.parent / "other", "--mlflow-port", state["mlflow"]["port"])
    assert taken.exit_code == 2 and f"port {state['mlflow']['port']} (mlflow)" in taken.output
    again = run("up", "--run-dir", run_dir)
    assert again.exit_code == 2 and "already running" in again.output


def test_the_flow_on_the_real_stack_tracks_pushes_and_a_pull_restores_identical_files(stack, project):
    import hashlib
    import shutil

    import boto3
    from mlflow import MlflowClient

    from pruneflow.infra.stack import client_env
    from pruneflow.tasks.stage import dvc_bin
    from tests.conftest import sh

    state = stack[1]
    env = client_env(state)
    dvc = dvc_bin()
    sh([dvc, "remote", "add", "-d", "store", "s3://dvc/flow-test"], project)
    sh([dvc, "remote", "modify", "--local", "store", "endpointurl", env["AWS_ENDPOINT_URL"]], project)
    sh(["git", "commit", "-qam", "remote"], project)
    # a separate process, as a user runs it (Prefect's client workers then never outlive the servers here)
    proc = subprocess.run([sys.executable, "-m", "pruneflow.cli", "run", "--params", str(project / "params.yaml"),
                           "--name", "on-stack"], cwd=project, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on-stack: source (ran), calibrate (ran), score (ran), prune (ran), recover (ran), evaluate (ran)" in \
        proc.stderr + proc.stdout
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=KEY, aws_secret_access_key=SECRET)
    assert s3.list_objects_v2(Bucket="dvc", Prefix="flow-test/").get("KeyCount", 0) > 5  # pushed
    client = MlflowClient(state["mlflow"]["url"])
    (run_,) = client.search_runs([client.get_experiment_by_name("pruneflow").experiment_id],
                                 filter_string="attributes.run_name = 'on-stack'")
    assert run_.info.status == "FINISHED" and run_.data.tags["prefect.flow_run_id"]
    flow_runs = api(env, "/flow_runs/filter", {})
    assert any(r["state_type"] == "COMPLETED" for r in flow_runs)  # the run is on the real server
    # credentials were in this run's environment: they appear in no output, parameter, tag or file
    leaked = ["output" for text in (proc.stdout, proc.stderr) if SECRET in text]
    leaked += [f"MLflow {k}" for k, v in {**run_.data.params, **run_.data.tags}.items() if SECRET in str(v)]
    leaked += ["Prefect parameters" for r in flow_runs if SECRET in json.dumps(r.get("parameters"))]
    leaked += [str(p) for p in project.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000
               and SECRET.encode() in p.read_bytes()]
    assert leaked == []

    def digests():
        return {p.relative_to(project): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((project / "artifacts").rglob("*")) if p.is_file()}

    before = digests()
    for name in ("calibration", "scores", "model", "recovered"):
        shutil.rmtree(project / "artifacts" / name)
    shutil.rmtree(project / ".dvc" / "cache")
    sh([dvc, "pull"], project)
    assert digests() == before and len(before) > 5


def test_preflight_fails_fast_when_the_remote_rejects_the_credentials(stack, project, monkeypatch):
    from prefect.logging import disable_run_logger

    from pruneflow.infra.stack import client_env
    from pruneflow.errors import PruneflowError
    from pruneflow.tasks.remote import preflight
    from pruneflow.tasks.stage import dvc_bin
    from tests.conftest import sh

    env = client_env(stack[1])
    dvc = dvc_bin()
    sh([dvc, "remote", "add", "-d", "store", "s3://dvc/x"], project)
    sh([dvc, "remote", "modify", "--local", "store", "endpointurl", env["AWS_ENDPOINT_URL"]], project)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with disable_run_logger(), pytest.raises(PruneflowError, match="DVC remote s3://dvc/x .* is not usable"):
        preflight.fn(str(project))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with disable_run_logger(), pytest.raises(PruneflowError, match="MLflow tracking server .* is unreachable"):
        preflight.fn(str(project))


def test_up_with_ray_starts_a_token_authenticated_head_that_runs_workers(tmp_path):
    """`pruneflow up --ray`'s head: a client with the stack's environment runs tasks on it through Ray Client;
    one without the token is refused; `down` stops it."""
    pytest.importorskip("ray")
    from pruneflow.infra import stack

    ports = dict(zip(("ray", "ray-client", "ray-dashboard"), stack.free_ports(3)))
    state: dict = {}
    try:
        stack.start(stack.ray_head(tmp_path, ports), tmp_path, state, timeout=120)
        assert (tmp_path / "ray" / "token").read_text() not in (tmp_path / "stack.json").read_text()
        assert oct((tmp_path / "ray" / "token").stat().st_mode & 0o777) == "0o600"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        client = {**env, "RAY_ADDRESS": state["ray"]["url"], "RAY_AUTH_MODE": "token",
                  "RAY_AUTH_TOKEN_PATH": state["ray"]["token_path"]}
        code = ("import os, ray; from pruneflow.execution.replicas import connect; connect(os.environ['RAY_ADDRESS']); "
                "f = ray.remote(lambda x: x * 2); print('answer', ray.get(f.remote(21)))")  # as --workers joins
        ok = subprocess.run([sys.executable, "-c", code], env=client, capture_output=True, text=True, timeout=200)
        logs = Path(state["ray"]["temp_dir"], "session_latest", "logs")
        assert "answer 42" in ok.stdout, ok.stderr[-2000:] + "".join(
            f"\n== {f.name}\n{f.read_text()[-1500:]}" for f in sorted(logs.glob("ray_client_server*.err")))
        stranger = {**env, "RAY_ADDRESS": state["ray"]["url"], "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": "0" * 64}
        refused = subprocess.run([sys.executable, "-c", code], env=stranger, capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode != 0 and "answer" not in refused.stdout
        alone = ("import ray; ray.init(num_cpus=1, include_dashboard=False); "
                 "print('own', ray.get_runtime_context().gcs_address)")  # a run's own instance, beside the head
        own = subprocess.run([sys.executable, "-c", alone], env=env, capture_output=True, text=True, timeout=120)
        assert "own" in own.stdout and f":{ports['ray']}" not in own.stdout, own.stderr[-2000:]
    finally:
        stopped = stack.down(tmp_path)
        shutil.rmtree(state.get("ray", {}).get("temp_dir", tmp_path / "none"), ignore_errors=True)
    assert stopped == ["ray"] and not stack._alive(state["ray"]["pid"])


def test_the_tests_sharing_the_stack_run_on_one_worker(request):
    """`make test` runs pytest-xdist with --dist loadgroup: this module's tests carry the group in their node id,
    which puts them on one worker with the stack (pytest 9.2 ignores the id pytest-xdist 3.8 sets: the group was
    silently lost, and the stack, vLLM and the Ray head ran on both workers, beside anything)."""
    if getattr(request.config.option, "loadgroup", False):
        assert request.node.nodeid.endswith("@stack")


def test_the_store_takes_a_write_in_every_bucket_on_a_machine_with_little_free_disk(tmp_path, monkeypatch):
    """SeaweedFS's own volume count (free disk / 1 GB) left the second bucket no room for its first 7 volumes
    below ~14 GB free: CI's stack failed every write to it with InternalError. (The filer's own collection takes 7
    more when it first flushes its log.)"""
    from collections import namedtuple

    from pruneflow.infra import stack

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(stack.shutil, "disk_usage", lambda path: usage(2 << 30, 1 << 30, 1 << 30))
    run_dir, state = tmp_path / "small", {}
    s3 = stack.services(run_dir, dict(zip(("s3", "mlflow", "prefect"), stack.free_ports(3))))[0]
    try:
        stack.start(s3, run_dir, state)
        stack.create_buckets(state["s3"]["url"], Path(state["s3"]["log"]))  # writes an object in each bucket
    finally:
        stack.down(run_dir, grace=1)  # SeaweedFS's filer takes 15 s to give up its streams on SIGTERM


def test_up_refuses_an_s3_that_answers_but_cannot_store_and_leaves_nothing_running(tmp_path, monkeypatch):
    from pruneflow.infra import stack

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(stack, "volume_slots", lambda data_dir: 1)  # room for one bucket's volume, not two
    ports = dict(zip(("s3", "mlflow", "prefect"), stack.free_ports(3)))
    run_dir = tmp_path / "full"
    result = run("up", "--run-dir", run_dir, "--s3-port", ports["s3"], "--mlflow-port", ports["mlflow"],
                 "--prefect-port", ports["prefect"])
    assert result.exit_code == 2, result.output
    assert f"the S3 store at http://127.0.0.1:{ports['s3']} answers but cannot store an object in bucket " \
           "'mlflow'" in result.output
    assert f"its log: {run_dir / 'logs' / 's3.log'}" in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (run_dir / "stack.json").exists()
    assert not stack._answers(f"http://127.0.0.1:{ports['s3']}")  # stopped again
