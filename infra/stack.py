"""The local stack, on 127.0.0.1 only: SeaweedFS (S3, credentials enforced), an MLflow server (SQLite, artifacts
proxied to S3) and a Prefect server (SQLite); with ``--ray``, a Ray head too (token authentication on, the token
generated into the run directory, clients reach it through Ray Client). `pruneflow up | down | status`.

Everything lives under one run directory: data, logs, and ``stack.json`` (pids, ports, URLs — never
credentials). The S3 credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and
are the only identity SeaweedFS accepts; anonymous and wrong-key requests are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pruneflow.atomic import pid_alive
from pruneflow.errors import PruneflowError

HOST = "127.0.0.1"
BUCKETS = ("dvc", "mlflow")
DEFAULT_PORTS = {"s3": 8333, "mlflow": 5000, "prefect": 4200}
RAY_PORTS = {"ray": 6379, "ray-client": 10001, "ray-dashboard": 8265}
RAY_WORKER_PORTS = (20000, 20999)  # outside Ray's default 10002-19999, which would hold a client port of 10001+
# every other listener `weed server -s3` opens gets a free port, so two stacks (or a test) never collide
SEAWEED_INTERNAL_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                          "filer.port.grpc", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance")
VOLUME_MB = 1024  # per volume; SeaweedFS's 30 GB default with its automatic count runs out after a bucket or two
VOLUME_GROWTH = 7  # volumes SeaweedFS creates at once for a bucket's first write (its volume_growth copy_1)


@dataclass
class Service:
    name: str
    port: int
    command: list[str]
    env: dict[str, str]
    health: str  # URL that answers once the service is ready
    extra: dict = field(default_factory=dict)  # more for stack.json (paths, never secrets)


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def credentials() -> tuple[str, str]:
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key or not secret:
        raise PruneflowError("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: the local S3 accepts exactly "
                             "these credentials (they are never written to params, logs or MLflow)")
    return key, secret


def free_ports(n: int, avoid: Iterable[int] = ()) -> list[int]:
    """``n`` different free ports, none of ``avoid``: their sockets are held open together, since the OS may hand
    a port it just freed out again (SeaweedFS's master once got the port the same stack had given MLflow)."""
    avoid, socks, ports = set(avoid), [], []
    try:
        while len(ports) < n:
            socks.append(socket.socket())
            socks[-1].bind((HOST, 0))
            if (port := socks[-1].getsockname()[1]) not in avoid:
                ports.append(port)
    finally:
        for sock in socks:
            sock.close()
    return ports


def free_port() -> int:
    return free_ports(1)[0]


def _port(name: str) -> str:
    """How the user names ``name``'s port: its ``up`` option, or Ray's fixed one."""
    fixed = {"ray": "Ray's GCS port", "ray-dashboard": "Ray's dashboard port"}
    return fixed.get(name, f"--{name}-port")


def _check_ports(ports: dict[str, int]) -> None:
    """Each service its own port, a real one (0 would let the OS pick one stack.json could not name)."""
    taken: dict[int, str] = {}
    for name, port in ports.items():
        if not 1 <= port <= 65535:
            raise PruneflowError(f"{_port(name)} {port}: a port is a number from 1 to 65535")
        if port in taken:
            raise PruneflowError(f"{_port(taken[port])} and {_port(name)} are both {port}: each service needs its "
                                 f"own port")
        taken[port] = name


def _check_free(name: str, port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            raise PruneflowError(f"port {port} ({name}) on {HOST} is already in use; stop what uses it or pick "
                                 f"another port ({_port(name)})") from None


def services(run_dir: Path, ports: dict[str, int]) -> list[Service]:
    key, secret = credentials()
    s3_url = f"http://{HOST}:{ports['s3']}"
    identities = run_dir / "seaweedfs" / "s3.json"
    identities.parent.mkdir(parents=True, exist_ok=True)
    identities.touch(mode=0o600)
    identities.write_text(json.dumps({"identities": [{"name": "pruneflow", "credentials": [
        {"accessKey": key, "secretKey": secret}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    (run_dir / "seaweedfs" / "data").mkdir(exist_ok=True)
    base = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    return [
        Service("s3", ports["s3"], [
            _bin("weed"), "server", f"-dir={run_dir / 'seaweedfs' / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
            *[f"-{flag}={port}" for flag, port in
              zip(SEAWEED_INTERNAL_PORTS, free_ports(len(SEAWEED_INTERNAL_PORTS), avoid=ports.values()))],
            "-s3", f"-s3.port={ports['s3']}", f"-s3.config={identities}",
            f"-volume.max={volume_slots(run_dir / 'seaweedfs' / 'data')}",
            f"-master.volumeSizeLimitMB={VOLUME_MB}",
            # after its filer's 15 s stop, the volume server's 10 s default wait (for other masters to learn it
            # leaves: there are none) took SeaweedFS past `down`'s grace; it is SIGKILLed no more
            "-volume.preStopSeconds=1"], base, s3_url),
        Service("mlflow", ports["mlflow"], [
            _bin("mlflow"), "server", "--host", HOST, "--port", str(ports["mlflow"]), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}",
            "--artifacts-destination", "s3://mlflow/"],
            {**base, "MLFLOW_S3_ENDPOINT_URL": s3_url, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
             "MLFLOW_DISABLE_TELEMETRY": "true"}, f"http://{HOST}:{ports['mlflow']}/health"),
        Service("prefect", ports["prefect"], [
            _bin("prefect"), "server", "start", "--host", HOST, "--port", str(ports["prefect"])],
            # the UI asks /ui-settings where its API is; without these it answers port 4200 whatever --port says
            {**base, "PREFECT_HOME": str(run_dir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
             "PREFECT_SERVER_API_HOST": HOST, "PREFECT_SERVER_API_PORT": str(ports["prefect"]),
             "PREFECT_UI_API_URL": f"http://{HOST}:{ports['prefect']}/api"},
            f"http://{HOST}:{ports['prefect']}/api/health"),
    ]


def volume_slots(data_dir: Path) -> int:
    """How many volumes SeaweedFS may create: the free disk's worth, plus one first growth per bucket, so that
    the disk is what limits the store. SeaweedFS's own automatic count (``-volume.max=0``: free disk / volume
    size) is too few below ~14 GB free: the second bucket's first write found no room for its 7 volumes and
    failed with InternalError (CI's stack did). Volumes are sparse files: a slot costs no disk until written."""
    return shutil.disk_usage(data_dir).free // (VOLUME_MB << 20) + VOLUME_GROWTH * (len(BUCKETS) + 1)


def ray_head(run_dir: Path, ports: dict[str, int]) -> Service:
    """A Ray head (``ray start --head --block``: the process group ``down`` stops) with token authentication
    on: a fresh token in ``RUN_DIR/ray/token`` (mode 600; never in stack.json), read by the head and by every
    client through ``RAY_AUTH_TOKEN_PATH``. Ready once its Ray Client port accepts connections."""
    import secrets

    token = run_dir / "ray" / "token"
    token.parent.mkdir(parents=True, exist_ok=True)
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_AUTH_TOKEN", None)  # the file is the one token: a stale variable would take precedence
    env.pop("RAY_ADDRESS", None)  # `ray start --head` starts a cluster; it does not join one
    low, high = RAY_WORKER_PORTS
    # its own session directory: Ray's default (/tmp/ray) also tells every plain ray.init() on this machine to
    # join this head, so a local `--workers N` run meant to start its own instance would fail (short: socket
    # paths must stay under 107 bytes)
    temp = tempfile.mkdtemp(prefix="pruneflow-ray-", dir="/tmp")
    return Service("ray", ports["ray-client"], [
        _bin("ray"), "start", "--head", "--block", "--temp-dir", temp, "--node-ip-address", HOST,
        "--port", str(ports["ray"]),
        "--ray-client-server-port", str(ports["ray-client"]), "--dashboard-host", HOST,
        "--dashboard-port", str(ports["ray-dashboard"]), "--min-worker-port", str(low),
        "--max-worker-port", str(high), "--disable-usage-stats"], env, f"tcp://{HOST}:{ports['ray-client']}",
        {"token_path": str(token), "temp_dir": temp, "gcs_port": ports["ray"], "dashboard": f"http://{HOST}:{ports['ray-dashboard']}"})


def _answers(url: str) -> bool:
    if url.startswith("tcp://"):  # a port that accepts connections (a gRPC server: no HTTP to ask)
        host, _, port = url.removeprefix("tcp://").rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return True
        except OSError:
            return False
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # it answered (S3 refuses anonymous requests with 403: that is the point)
    except (urllib.error.URLError, OSError):
        return False


def _wait(service: Service, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
            raise PruneflowError(f"{service.name} exited with {process.returncode} while starting; log {log}:\n{tail}")
        if _answers(service.health):
            return
        time.sleep(0.5)
    raise PruneflowError(f"{service.name} did not answer {service.health} within {timeout:.0f} s; log: {log}")


def create_buckets(endpoint: str, log: Path | None = None) -> None:
    """Create the buckets and write (then delete) an object in each: an S3 that answers but cannot store
    (no volume to write to, a full disk) is refused here, not mid-push in a run."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for bucket in BUCKETS:
        if bucket not in existing:
            s3.create_bucket(Bucket=bucket)
        try:
            s3.put_object(Bucket=bucket, Key=".pruneflow-probe", Body=b"probe")
            s3.delete_object(Bucket=bucket, Key=".pruneflow-probe")
        except (BotoCoreError, ClientError) as err:
            where = (f"; {shutil.disk_usage(log.parent).free >> 20} MiB free on its disk; its log: {log}"
                     if log else "")
            raise PruneflowError(f"the S3 store at {endpoint} answers but cannot store an object in bucket "
                                 f"'{bucket}' ({err}){where}") from None


def up(run_dir: Path, ports: dict[str, int] | None = None, timeout: float = 120, ray: bool = False) -> dict:
    """Start the three services, and a Ray head with ``ray`` (refusing if the stack runs or a port is taken);
    returns stack.json."""
    run_dir = Path(run_dir).resolve()
    ports = {**DEFAULT_PORTS, **(RAY_PORTS if ray else {}), **(ports or {})}
    credentials()  # everything that can be refused is, before anything is created
    if timeout <= 0:
        raise PruneflowError(f"--timeout {timeout:g}: the seconds each service may take to answer must be positive")
    if ray and not Path(_bin("ray")).exists() and shutil.which("ray") is None:
        raise PruneflowError("--ray needs Ray, which is not installed: pip install 'pruneflow[ray]'")
    if run_dir.exists() and not run_dir.is_dir():
        raise PruneflowError(f"--run-dir {run_dir} is a file: the stack needs a directory for its data and logs")
    if (run_dir / "stack.json").exists() and any(s["alive"] for s in status(run_dir).values()):
        raise PruneflowError(f"the stack in {run_dir} is already running (`pruneflow status`, `pruneflow down`)")
    _check_ports(ports)
    for name, port in ports.items():
        _check_free(name, port)
    try:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (run_dir / "mlflow").mkdir(exist_ok=True)
    except OSError as err:
        raise PruneflowError(f"cannot create the stack's directory {run_dir}: {err.strerror or err}") from None
    state: dict[str, dict] = {}
    try:
        for service in services(run_dir, ports) + ([ray_head(run_dir, ports)] if ray else []):
            start(service, run_dir, state, timeout)
            if service.name == "s3":
                create_buckets(state["s3"]["url"], Path(state["s3"]["log"]))
    except BaseException:
        down(run_dir)
        raise
    return state


def start(service: Service, run_dir: Path, state: dict, timeout: float = 120) -> None:
    """Start one service in its own session, record it in ``state`` (and stack.json), wait until it answers."""
    log = run_dir / "logs" / f"{service.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(service.command, env=service.env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, cwd=run_dir)
    scheme = "ray" if service.name == "ray" else "http"
    state[service.name] = {"pid": process.pid, "port": service.port, "health": service.health,
                           "url": f"{scheme}://{HOST}:{service.port}", "log": str(log), **service.extra}
    _write_state(run_dir, state)
    _wait(service, process, log, timeout)


def _write_state(run_dir: Path, state: dict) -> None:
    tmp = run_dir / "stack.json.tmp"
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, run_dir / "stack.json")


def _alive(pid: int) -> bool:
    try:  # reap it if it is our own child (a zombie still answers kill 0)
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    return pid_alive(pid)


def status(run_dir: Path) -> dict[str, dict]:
    """Per service: pid alive, and whether it answers its health URL."""
    path = Path(run_dir) / "stack.json"
    if not path.exists():
        return {}
    state = json.loads(path.read_text())
    return {name: {**s, "alive": _alive(s["pid"]), "healthy": _alive(s["pid"]) and _answers(s["health"])}
            for name, s in state.items()}


def down(run_dir: Path, grace: float = 20) -> list[str]:
    """Stop every service of the stack (SIGTERM to its process group, SIGKILL after ``grace`` seconds)."""
    path = Path(run_dir) / "stack.json"
    if not path.exists():
        return []
    state = json.loads(path.read_text())
    for s in state.values():
        try:
            os.killpg(s["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(s["pid"]) for s in state.values()):
        time.sleep(0.2)
    for s in state.values():
        if _alive(s["pid"]):
            try:
                os.killpg(s["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5  # SIGKILL is not instant: stopped means gone
    while time.monotonic() < deadline and any(_alive(s["pid"]) for s in state.values()):
        time.sleep(0.1)
    path.unlink()
    return list(state)


def client_env(state: dict) -> dict[str, str]:
    """What clients set to use the stack (no credentials: those stay in the user's environment)."""
    env = {"PREFECT_API_URL": f"{state['prefect']['url']}/api", "MLFLOW_TRACKING_URI": state["mlflow"]["url"],
           "AWS_ENDPOINT_URL": state["s3"]["url"], "MLFLOW_S3_ENDPOINT_URL": state["s3"]["url"]}
    if "ray" in state:  # `--workers N` then runs its workers on this head
        env.update({"RAY_ADDRESS": state["ray"]["url"], "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": state["ray"]["token_path"]})
    return env
