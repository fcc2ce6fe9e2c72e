"""What a team deploys: infra/compose.yaml, the Kubernetes GPU work-pool template, prefect.yaml."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "infra" / "compose.yaml"
TEMPLATE = ROOT / "infra" / "k8s" / "gpu-work-pool.json"
ENV = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "POSTGRES_PASSWORD": "p"}


def test_compose_services_reference_each_other_bind_localhost_and_hold_no_secret():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"prefect-server", "prefect-db", "mlflow", "mlflow-db", "minio", "worker"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        depends = service.get("depends_on", [])
        assert set(depends) <= set(services), f"{name} depends on an undefined service"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    assert "postgresql+asyncpg://" in str(services["prefect-server"]["environment"])
    assert "--artifacts-destination s3://mlflow/" in services["mlflow"]["command"]
    text = COMPOSE.read_text()
    for secret in ("AWS_SECRET_ACCESS_KEY", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"):
        for value in re.findall(rf"{secret}: (.+)", text):
            assert value.startswith("${"), f"{secret} is written in compose.yaml instead of read from the env"


@pytest.mark.skipif(subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
                    if shutil.which("docker") else True, reason="no docker compose client on this machine")
def test_docker_compose_accepts_the_file():
    proc = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True,
                          text=True, env={**os.environ, **ENV})
    assert proc.returncode == 0, proc.stderr


def _render(node, values):
    if isinstance(node, dict):
        return {k: _render(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_render(v, values) for v in node]
    if isinstance(node, str):
        whole = re.fullmatch(r"\{\{ (\w+) \}\}", node)
        if whole:
            return values[whole.group(1)]
        return re.sub(r"\{\{ (\w+) \}\}", lambda m: str(values[m.group(1)]), node)
    return node


def test_the_gpu_work_pool_template_declares_its_variables_and_renders_a_gpu_job():
    template = json.loads(TEMPLATE.read_text())
    declared = template["variables"]["properties"]
    used = set(re.findall(r"\{\{ (\w+) \}\}", json.dumps(template["job_configuration"])))
    assert used <= set(declared), f"undeclared variables: {used - set(declared)}"
    values = {k: v.get("default") for k, v in declared.items()} | {"command": "prefect flow-run execute"}
    job = _render(template["job_configuration"]["job_manifest"], values)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["envFrom"][0]["secretRef"]["name"] == "pruneflow-credentials"  # credentials from a Secret
    pod = job["spec"]["template"]["spec"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job" and pod["restartPolicy"] == "Never"
    assert container["args"] == "prefect flow-run execute" and container["image"]


def test_prefect_yaml_names_real_flows_and_valid_schedules():
    from prefect.schedules import Cron

    from pruneflow.flows import deployments

    entries = deployments.read(ROOT)
    assert [d["name"] for d in entries] == ["pruneflow", "sweep"]
    for entry in entries:
        flow = deployments.load_flow(entry["entrypoint"])
        assert flow.name in ("pruneflow", "pruneflow-sweep")
        assert set(entry.get("parameters") or {}) <= set(flow.parameters.properties)
        for schedule in entry["schedules"]:
            Cron(schedule["cron"], timezone=schedule["timezone"])


def test_a_dvc_failure_is_reported_by_its_error_lines_without_the_support_footer():
    from pruneflow.tasks.workspace import dvc_error

    stderr = ("Collecting\nERROR: failed to transfer 'ba3e' - Connection was closed\nERROR: unexpected error - "
              "Could not connect to the endpoint URL: \"http://127.0.0.1:9/dvc\"\n\nHaving any troubles? Hit us "
              "up at https://dvc.org/support, we are always happy to help!\n")
    assert dvc_error(stderr) == ("ERROR: failed to transfer 'ba3e' - Connection was closed\nERROR: unexpected "
                                 "error - Could not connect to the endpoint URL: \"http://127.0.0.1:9/dvc\"")
    assert dvc_error("plain failure\n") == "plain failure"
    long = dvc_error("ERROR: " + "x" * 2000 + " the cause")
    assert long.startswith("…") and long.endswith("the cause") and len(long) == 801
