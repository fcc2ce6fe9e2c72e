"""Deployments from prefect.yaml: served in-process (``pruneflow serve``) or registered on a work pool
(``pruneflow deploy``). prefect.yaml stays the one list of deployments and schedules; the ``params`` form is
pre-filled from the checkout's params.yaml so the UI starts from what ``pruneflow run`` would run.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import yaml

from pruneflow.errors import PruneflowError
from pruneflow.pipeline.params import load_params

CODE = Path(__file__).resolve().parents[1]  # the checkout whose flows/ the entrypoints name


def read(repo: Path, names: list[str] | None = None) -> list[dict]:
    """The deployments of ``repo``/prefect.yaml, else the code checkout's (all, or those named)."""
    path = Path(repo) / "prefect.yaml"
    path = path if path.is_file() else CODE / "prefect.yaml"
    if not path.is_file():
        raise PruneflowError(f"{path} not found: deployments are declared there")
    try:
        entries = (yaml.safe_load(path.read_text()) or {}).get("deployments") or []
    except yaml.YAMLError as err:
        raise PruneflowError(f"{path} is not valid YAML: {err}") from None
    known = [d.get("name") for d in entries]
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise PruneflowError(f"no deployment named {', '.join(unknown)} in {path}; it declares {', '.join(known)}")
    return [d for d in entries if not names or d["name"] in names]


def load_flow(entrypoint: str):
    """The flow object an entrypoint such as ``flows/pipeline.py:pipeline`` names."""
    file, _, attr = entrypoint.partition(":")
    spec = importlib.util.spec_from_file_location(f"pruneflow_entry_{Path(file).stem}", CODE / file)
    if spec is None or not attr:
        raise PruneflowError(f"bad entrypoint {entrypoint!r} in prefect.yaml (expected path.py:flow)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return getattr(module, attr)


def _schedules(entry: dict) -> list:
    from prefect.schedules import Cron, Interval

    out = []
    for s in entry.get("schedules") or []:
        kwargs = {"timezone": s.get("timezone"), "active": s.get("active", True)}
        if "cron" in s:
            out.append(Cron(s["cron"], **kwargs))
        elif "interval" in s:
            out.append(Interval(s["interval"], **kwargs))
        else:
            raise PruneflowError(f"deployment {entry['name']}: schedules take cron or interval, got {sorted(s)}")
    return out


def _parameters(repo: Path, entry: dict) -> dict:
    params = load_params(Path(repo) / "params.yaml").model_dump()
    return {"params": params, "repo": str(Path(repo).resolve()), **(entry.get("parameters") or {})}


def serve(repo: Path, names: list[str] | None = None, limit: int | None = None, schedules: bool = True) -> None:
    """Serve the deployments in this process until interrupted (schedules stay active on shutdown)."""
    from prefect import serve as prefect_serve

    deployments = []
    for entry in read(repo, names):
        flow = load_flow(entry["entrypoint"])
        deployments.append(flow.to_deployment(
            name=entry["name"], description=entry.get("description"), tags=entry.get("tags"),
            parameters=_parameters(repo, entry), schedules=_schedules(entry) if schedules else None))
    prefect_serve(*deployments, pause_on_shutdown=False, limit=limit)


def ensure_pool(name: str) -> bool:
    """Create the work pool ``name`` as a process pool (with the process worker's default job template, as
    `prefect work-pool create --type process` does) unless it exists; whether it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type=ProcessWorker.type,
                base_job_template=ProcessWorker.get_default_base_job_template()))
            return True


def deploy(repo: Path, pool: str | None = None, names: list[str] | None = None,
           on_created=lambda pool: None) -> list[str]:
    """Register the deployments on a work pool (source: this code checkout; workers run it in place, on the
    data workspace ``repo``), creating a missing pool as a process pool (``on_created`` is told); returns their
    ids."""
    from prefect import flow as prefect_flow

    ids, entries = [], read(repo, names)
    pools = {}
    for entry in entries:
        pools[entry["name"]] = pool or (entry.get("work_pool") or {}).get("name")
        if not pools[entry["name"]]:
            raise PruneflowError(f"deployment {entry['name']}: no work pool (pass --pool or set work_pool.name)")
    for work_pool in dict.fromkeys(pools.values()):
        if ensure_pool(work_pool):
            on_created(work_pool)
    for entry in entries:
        work_pool = pools[entry["name"]]
        source = prefect_flow.from_source(source=str(CODE), entrypoint=entry["entrypoint"])
        ids.append(str(source.deploy(
            name=entry["name"], work_pool_name=work_pool, description=entry.get("description"),
            tags=entry.get("tags"), parameters=_parameters(repo, entry), schedules=_schedules(entry),
            job_variables=(entry.get("work_pool") or {}).get("job_variables"), build=False, push=False,
            print_next_steps=False)))
    return ids
