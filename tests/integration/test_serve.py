"""`pruneflow serve` against the real Prefect server: the deployment appears with its cron schedule and a
parameter form filled from params.yaml, a run triggered through the API completes, and stopping the server
process leaves the schedule active."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import interruptible
from tests.integration.test_deployments import api, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("stack")]  # one worker starts the stack


def test_served_deployment_runs_from_the_api_and_keeps_its_schedule(stack, project):
    from pruneflow.infra.stack import client_env
    from pruneflow.pipeline.params import load_params

    (project / "prefect.yaml").write_text(yaml.safe_dump({"deployments": [{
        "name": "served", "entrypoint": "flows/pipeline.py:pipeline",
        "schedules": [{"cron": "30 2 * * 1", "timezone": "UTC", "active": True}]}]}))
    env = {**os.environ, **client_env(stack[1])}
    log = open(project.parent / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "pruneflow.cli", "serve", "--repo", str(project)], cwd=project,
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              preexec_fn=interruptible)  # stopped by SIGINT below
    try:
        deployment = None
        for _ in range(60):
            try:
                deployment = api(env, "/deployments/name/pruneflow/served")
                break
            except Exception:  # noqa: BLE001 - 404 until serve has registered it
                assert server.poll() is None, (project.parent / "serve.log").read_text()[-3000:]
                time.sleep(1)
        assert deployment is not None, "serve never registered the deployment"
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["30 2 * * 1"]
        assert deployment["parameters"]["params"] == load_params(project / "params.yaml").model_dump()
        params = load_params(project / "params.yaml", ["evaluate.max_windows=2"]).model_dump()
        created = api(env, f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"params": params}})
        finished = wait_for(env, created["id"])
        assert finished["state_type"] == "COMPLETED", finished["state"]
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=60)
    after = api(env, "/deployments/name/pruneflow/served")
    assert not after["paused"] and all(s["active"] for s in after["schedules"])  # pause_on_shutdown=False
