"""The DVC remote side of a run: a preflight check before any compute, and the push after the stages.

The remote is whatever `dvc remote default` names (S3 here: SeaweedFS from `pruneflow up`, MinIO or AWS —
the endpoint comes from AWS_ENDPOINT_URL or the remote's `endpointurl`, credentials from the environment
or AWS config, never from params). No default remote: nothing to check or push.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pruneflow.atomic import pid_alive
from pruneflow.errors import PruneflowError
from pruneflow.tasks.workspace import run_dvc


def _remote_config(workspace: Path) -> tuple[str | None, dict[str, dict]]:
    """(the default remote's name, every remote's settings) from DVC's config, every level merged (system,
    global, the repository's, local), read in this process: a `dvc remote ...` process costs ~1 s of start-up."""
    from dvc.config import ConfigError
    from dvc.repo import Repo

    try:
        with Repo(str(workspace)) as repo:
            config = repo.config
            return config["core"].get("remote"), {k: dict(v) for k, v in config.get("remote", {}).items()}
    except ConfigError as err:
        raise PruneflowError(f"DVC's config in {workspace} is not valid: {err}") from None


def default_remote(workspace: Path) -> tuple[str, str] | None:
    """(name, url) of the default DVC remote, or None."""
    name, remotes = _remote_config(workspace)
    url = remotes.get(name, {}).get("url") if name else None
    return (name, str(url)) if url else None


def remote_endpoint(workspace: Path, name: str) -> str | None:
    """The remote's `endpointurl` (any config level), else AWS_ENDPOINT_URL, else None (AWS itself)."""
    _, remotes = _remote_config(workspace)
    return remotes.get(name, {}).get("endpointurl") or os.environ.get("AWS_ENDPOINT_URL")


def _check_s3(url: str, endpoint: str | None) -> None:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = url.removeprefix("s3://").split("/", 1)[0]
    try:
        # a fresh session: boto3's default one keeps the credentials it first saw
        boto3.session.Session().client("s3", endpoint_url=endpoint, config=_quick()).head_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError) as err:
        raise PruneflowError(f"DVC remote {url} (endpoint {endpoint or 'AWS default'}) is not usable: "
                             f"{str(err).splitlines()[0][:200]}") from None


def _quick():
    from botocore.config import Config

    return Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 3, "mode": "standard"})


def _health(url: str, attempts: int = 1) -> None:
    """GET ``url``/health; after ``attempts`` tries (backoff 1 s, 2 s, …) the last error is raised."""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5):
                return
        except (urllib.error.URLError, OSError, ValueError):
            if attempt == attempts - 1:
                raise
            time.sleep(2 ** attempt)


def _check_mlflow(uri: str) -> None:
    try:
        _health(uri)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise PruneflowError(f"MLflow tracking server {uri} is unreachable ({err}); start it (`pruneflow up`) "
                             f"or unset MLFLOW_TRACKING_URI to track into a local file") from None


def check_prefect_api(attempts: int = 3, needed_by: str | None = None) -> None:
    """With PREFECT_API_URL set, its server must answer /health (bounded retries with backoff); unset, Prefect
    starts a temporary local server itself — unless ``needed_by`` (a command whose deployments, workers or UI
    must outlive it) is given: then unset is an error."""
    url = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not url and needed_by:
        raise PruneflowError(f"{needed_by} needs a Prefect server that outlives it (deployments, work pools and the "
                             f"UI live there; a temporary one is gone when the command ends): set PREFECT_API_URL "
                             f"— `pruneflow up` starts one and prints the line — or point it at your team's server")
    if not url:
        return
    try:
        _health(url, attempts)
    except (urllib.error.URLError, OSError, ValueError) as err:
        or_else = "" if needed_by else " or unset PREFECT_API_URL to run with a temporary local one"
        raise PruneflowError(f"Prefect API {url} is unreachable after {attempts} attempts ({err}); start the "
                             f"server (`pruneflow up`){or_else}") from None


def _host_prefix() -> str:
    """The ``HOST:`` prefix of this host's ``infrastructure_pid`` values."""
    return socket.gethostname() + ":"


def record_process() -> None:
    """Inside a flow run started here (not by a worker, which does it itself): write this process into it as
    its ``infrastructure_pid`` — ``HOST:PID``, the process worker's form — so a later run can tell it died."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment, flow_run

    if flow_run.id and not deployment.id:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, infrastructure_pid=f"{_host_prefix()}{os.getpid()}")


def mark_orphaned_runs() -> list[str]:
    """Flow runs started on this host (not by a worker) that the server still shows Pending/Running although
    their process is gone (killed, or it lost the API before it could report): set them Crashed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    host, marked = _host_prefix(), []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING]))))
        for run in runs:
            infra = run.infrastructure_pid or ""
            if run.deployment_id or not infra.startswith(host):  # a worker's run, or another host's
                continue
            pid = infra[len(host):]
            if not pid.isdigit() or pid_alive(int(pid)):
                continue
            client.set_flow_run_state(run.id, Crashed(message=f"its process (pid {pid} on this host) ended "
                                                              f"without reporting"), force=True)
            marked.append(run.name)
    return marked


TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")


def check_tracking_uri(uri: str) -> None:
    """A tracking URI MLflow can use: a known scheme, and a host for http(s)."""
    from urllib.parse import urlparse

    if not uri:
        return
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    bad = (scheme not in TRACKING_SCHEMES and len(scheme) > 1) or " " in uri or (
        scheme in ("http", "https") and not parsed.netloc)
    if bad:
        raise PruneflowError(f"MLFLOW_TRACKING_URI={uri!r} is not a tracking URI MLflow can use (expected "
                             f"http(s)://HOST:PORT, sqlite:///PATH, postgresql://…, or a local path)")


@task(name="preflight", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 5])
def preflight(repo: str) -> dict:
    """Fail fast, before any compute: the tracking server, the DVC remote and the workspace must be usable."""
    repo_path = Path(repo)
    checked = {}
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    check_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        _check_mlflow(uri)
        checked["mlflow"] = uri
    remote = default_remote(repo_path)
    if remote and remote[1].startswith("s3://"):
        _check_s3(remote[1], remote_endpoint(repo_path, remote[0]))
        checked["dvc_remote"] = remote[1]
    if not os.access(repo_path, os.W_OK):
        raise PruneflowError(f"the workspace {repo_path} is not writable")
    get_run_logger().info("preflight ok: %s", checked or "local only")
    return checked


@task(name="push", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 10, 30])
def push(workspace: dict) -> str | None:
    """`dvc push` the run's outputs to the default remote (retried with backoff; a failed push is completed
    by the next run's push, since every output stays in the local cache)."""
    path = Path(workspace["path"])
    remote = default_remote(path)
    if remote is None:
        return None
    run_dvc(["push"], path)
    return remote[1]
