"""What a team deploys: infra/compose.yaml, the Kubernetes GPU work-pool template and RayCluster, prefect.yaml."""

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
RAYCLUSTER = ROOT / "infra" / "k8s" / "raycluster.yaml"
ENV = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "POSTGRES_PASSWORD": "p", "RAY_AUTH_TOKEN": "t"}


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
    for secret in ("AWS_SECRET_ACCESS_KEY", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "RAY_AUTH_TOKEN"):
        for value in re.findall(rf"{secret}: (.+)", text):
            assert value.startswith("${"), f"{secret} is written in compose.yaml instead of read from the env"


def test_compose_ray_nodes_join_the_head_publish_only_ray_client_and_keep_token_auth_on():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    head, node, worker = services["ray-head"], services["ray-worker"], services["worker"]
    assert head["command"].startswith("ray start --head --block --port=6379 --ray-client-server-port=10001")
    assert "--include-dashboard=false" in head["command"]
    assert head["ports"] == ["127.0.0.1:10001:10001"]  # Ray Client alone, on localhost alone
    assert node["command"].startswith("ray start --address=ray-head:6379 --block") and "ports" not in node
    assert node["depends_on"]["ray-head"]["condition"] == "service_healthy" and head["healthcheck"]["test"]
    # the flow runs' driver has no raylet of its own: it joins through Ray Client
    assert worker["environment"]["RAY_ADDRESS"] == "ray://ray-head:10001"
    assert head["image"] == node["image"] == worker["image"] == "pruneflow:latest"
    assert head["volumes"] == node["volumes"] == worker["volumes"]  # a model path resolves on every node
    ray = {name for name, s in services.items()
           if "ray start" in str(s.get("command")) or "RAY_ADDRESS" in (s.get("environment") or {})}
    assert ray == {"ray-head", "ray-worker", "worker"}
    for name in ray:
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", f"{name} turns Ray token auth off"
        assert env["RAY_AUTH_TOKEN"] == "${RAY_AUTH_TOKEN:?set RAY_AUTH_TOKEN}", f"{name}: a token not from the env"
    assert not re.search(r"RAY_AUTH_MODE\W+disabled", COMPOSE.read_text())


def _env_entries(node):
    if isinstance(node, dict):
        if "name" in node and ("value" in node or "valueFrom" in node):
            yield node
        for value in node.values():
            yield from _env_entries(value)
    elif isinstance(node, list):
        for value in node:
            yield from _env_entries(value)


def test_the_raycluster_has_gpu_workers_a_shared_model_volume_and_token_auth_from_a_secret():
    text = RAYCLUSTER.read_text()
    (cluster,) = [doc for doc in yaml.safe_load_all(text) if doc]
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    name, namespace = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    assert name == "pruneflow"
    # the jobs of the GPU work pool run in the same namespace and reach KubeRay's head Service by its short name
    pool = json.loads(TEMPLATE.read_text())["variables"]["properties"]
    assert namespace == pool["namespace"]["default"]
    assert f"RAY_ADDRESS\": \"ray://{name}-head-svc:10001" in text
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    assert {port["containerPort"] for port in head["containers"][0]["ports"]} >= {6379, 10001}
    assert "nvidia.com/gpu" not in str(head)
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (1, 0, 8)
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    for pod in (head, group["template"]["spec"]):
        container = pod["containers"][0]
        assert container["image"] == "pruneflow:latest"
        env = {entry["name"]: entry for entry in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"] == {"name": "RAY_AUTH_TOKEN",
                                         "valueFrom": {"secretKeyRef": {"name": "pruneflow-ray", "key": "token"}}}
        claims = {volume["name"]: volume["persistentVolumeClaim"]["claimName"] for volume in pod["volumes"]}
        assert {mount["mountPath"]: claims[mount["name"]] for mount in container["volumeMounts"]} == {
            "/models": "pruneflow-models"}
    for entry in _env_entries(cluster):  # nothing turns token auth off or writes a token down
        assert entry["name"] != "RAY_AUTH_MODE" or entry["value"] == "token"
        assert entry["name"] != "RAY_AUTH_TOKEN" or "secretKeyRef" in entry["valueFrom"]
    assert (cluster["spec"].get("authOptions") or {}).get("mode", "token") == "token"
    assert not re.search(r"RAY_AUTH_MODE\W+disabled", text)


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


def test_an_unreachable_prefect_api_suggests_a_temporary_server_only_where_one_would_do(monkeypatch):
    from pruneflow.errors import PruneflowError
    from pruneflow.infra.stack import free_port
    from pruneflow.tasks.remote import check_prefect_api

    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    with pytest.raises(PruneflowError, match=r"unreachable after 1 attempts .*; start the server \(`pruneflow up`\) "
                                             r"or unset PREFECT_API_URL to run with a temporary local one$"):
        check_prefect_api(attempts=1)  # pruneflow run: Prefect starts a temporary server itself
    with pytest.raises(PruneflowError) as err:  # deployments would be lost with a temporary one: never suggested
        check_prefect_api(attempts=1, needed_by="pruneflow deploy")
    assert str(err.value).endswith("start the server (`pruneflow up`)") and "unset" not in str(err.value)


def test_free_ports_are_different_and_avoid_the_ports_already_given():
    from pruneflow.infra.stack import free_ports

    given = free_ports(12)
    assert len(set(given)) == 12
    assert not set(free_ports(12, avoid=given)) & set(given)  # SeaweedFS's internal ports vs the stack's own
