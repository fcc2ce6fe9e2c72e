"""MLflow tracking of a flow run: one parent run, one nested run per stage, the pruned model registered.

Run ids are passed explicitly (MLflow's active run is thread-local). With ``MLFLOW_TRACKING_URI`` unset the
store is a SQLite file in the checkout (``mlflow.db``, artifacts under ``mlartifacts/``); set, it is that
server. The pruned model is registered with alias ``candidate``; ``champion`` moves to it only when every
quality gate in metrics.json passed.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pruneflow.pipeline.graph import RESOURCES

EXPERIMENT = "pruneflow"
STAGE_FILES = {"source": ["source.json"], "score": ["scores/scores.json", "scores/iterations.json"], "prune": ["model/plan.json"],
               "recover": ["recovered/recovery.json", "recovered/loss.csv"], "evaluate": ["metrics.json", "report"],
               "export": ["export/export.json"]}


def tracking_uri(repo: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(repo).resolve() / 'mlflow.db'}"


def _client(repo: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri(repo))


@contextmanager
def _local_store_lock(repo: Path):
    """An exclusive lock while the checkout's own SQLite store (``mlflow.db``) is opened; nothing for a server."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        yield
        return
    import fcntl

    lock = Path(repo).resolve() / ".dvc" / "tmp" / "mlflow-store.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_store(repo: Path) -> None:
    """Open the tracking store now (MLflow keeps one per URI): its schema check and the experiment lookup then
    happen before the flow, e.g. while a temporary Prefect server boots. A server URI: nothing to open."""
    if os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        return
    with _local_store_lock(Path(repo)):
        _experiment(_client(Path(repo)), Path(repo))


def _experiment(client, repo: Path) -> str:
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        return found.experiment_id
    local = None if os.environ.get("MLFLOW_TRACKING_URI") else (Path(repo).resolve() / "mlartifacts").as_uri()
    return client.create_experiment(EXPERIMENT, artifact_location=local)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} → {"a.b": 1}."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def numeric(tree: dict) -> dict[str, float]:
    """The flattened numbers of a nested dict (booleans as 0/1), as MLflow metrics take them."""
    return {k: float(v) for k, v in flatten(tree).items() if isinstance(v, (int, float))}


def _log_metrics(client, run_id: str, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])


def _log_curve(client, run_id: str, recovery: dict) -> None:
    """The recovery loss curve as stepped metrics (MLflow draws it), plus the summary numbers."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    curve = [Metric(f"recover.{key}", h[key], now, h["step"]) for h in recovery["history"] for key in ("loss", "ce", "kd")]
    for start in range(0, len(curve), 1000):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=curve[start:start + 1000])
    _log_metrics(client, run_id, {f"recover.{k}": v for k, v in numeric(recovery).items()})


@task(name="track-run", cache_policy=NO_CACHE)
def start_run(repo: str, params: dict, run_name: str, tags: dict[str, str]) -> str:
    """The parent run: flattened params, tags (code version, Prefect flow-run id); returns its id."""
    from mlflow.entities import Param

    with _local_store_lock(Path(repo)):  # two runs creating the local SQLite store at once race its migrations
        client = _client(Path(repo))
        experiment = _experiment(client, Path(repo))
    run = client.create_run(experiment, run_name=run_name, tags=tags)
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in flatten(params).items()])
    return run.info.run_id


@contextmanager
def system_metrics(repo: str, run_id: str):
    """CPU/memory (and GPU where available) sampled into ``run_id`` while the stages run."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(Path(repo)))
    with mlflow.start_run(run_id=run_id, log_system_metrics=True):
        yield


@task(name="track-stage", cache_policy=NO_CACHE)
def log_stage(repo: str, parent_id: str, result: dict, workspace: str, seconds: float) -> str:
    """A nested run for one stage: seconds, cached, dvc.lock output hashes, the stage's small outputs."""
    client = _client(Path(repo))
    parent = client.get_run(parent_id)
    tags = {"mlflow.parentRunId": parent_id, "pruneflow.stage": result["stage"],
            **{f"dvc.out.{path}": md5 for path, md5 in result["outs"].items()}}
    run = client.create_run(parent.info.experiment_id, run_name=result["stage"], tags=tags)
    metrics = {"seconds": seconds, "cached": float(result["cached"])}
    artifacts = Path(workspace) / "artifacts"
    resources = artifacts / RESOURCES / f"{result['stage']}.json"
    if resources.exists():  # the stage's own seconds and peak memory, as it last ran
        usage = json.loads(resources.read_text())
        metrics |= {"stage_seconds": usage["seconds"], "peak_memory_mb": usage["peak_bytes"] / 1e6}
    if result["stage"] == "evaluate":
        metrics |= numeric(json.loads((artifacts / "metrics.json").read_text()))
    _log_metrics(client, run.info.run_id, metrics)
    if result["stage"] == "recover" and (artifacts / "recovered" / "config.json").exists():
        _log_curve(client, run.info.run_id, json.loads((artifacts / "recovered" / "recovery.json").read_text()))
    for name in STAGE_FILES.get(result["stage"], []):
        if (artifacts / name).is_dir():
            client.log_artifacts(run.info.run_id, str(artifacts / name), name)
        elif (artifacts / name).exists():
            client.log_artifact(run.info.run_id, str(artifacts / name))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@task(name="register-model", cache_policy=NO_CACHE)
def register_model(repo: str, run_id: str, workspace: str, name: str) -> dict:
    """Log the final checkpoint (the recovered one when recovery ran, else the pruned one; transformers flavor
    when vanilla-loadable, else the directory as artifacts), register it as ``candidate``, and as ``champion``
    when every gate passed."""
    logger = get_run_logger()
    client = _client(Path(repo))
    artifacts = Path(workspace) / "artifacts"
    metrics = json.loads((artifacts / "metrics.json").read_text())
    model_dir = artifacts / ("recovered" if metrics.get("final") == "recovered" else "model")
    _log_metrics(client, run_id, numeric(metrics))
    client.log_artifact(run_id, str(artifacts / "metrics.json"))
    vanilla = json.loads((model_dir / "pruneflow.json").read_text())["vanilla"]
    digest = _dir_md5(Path(workspace), model_dir)
    version = _registered(client, name, digest)
    if version is None:  # a model not registered before: log and register it
        version = _log_and_register(client, repo, run_id, name, model_dir, vanilla)
        if digest:
            client.set_model_version_tag(name, str(version.version), "pruneflow.model_md5", digest)
    client.set_tag(run_id, "pruneflow.registered_model", f"{name}/{version.version}")
    set_alias(client, name, "candidate", version.version)
    promoted = bool(metrics.get("gates_passed"))
    if promoted:
        set_alias(client, name, "champion", version.version)
    logger.info("registered %s version %s as candidate%s", name, version.version,
                " and champion" if promoted else " (gates failed: not promoted)")
    exports = _log_exports(client, run_id, name, version, artifacts / "export")
    return {"name": name, "version": str(version.version), "champion": promoted, "flavor":
            "transformers" if vanilla else "artifacts", "exports": exports}


def _log_exports(client, run_id: str, name: str, version, export_dir: Path) -> dict[str, str]:
    """The export stage's files (GGUF, its quantized copies as ``gguf_TYPE``, ONNX) logged beside the registered version, each version tagged with
    where its file is (``pruneflow.model.export.gguf`` = ``runs:/RUN/export/model.gguf``); {format: that URI}. A
    version that already has a format's tag (a cached re-run of the same model) keeps it: nothing re-logged."""
    path = export_dir / "export.json"
    if not path.exists():
        return {}
    summary, tags = json.loads(path.read_text()), dict(version.tags or {})
    out = {}
    files = {fmt: summary[fmt] for fmt in summary.get("formats", [])}
    files.update({f"gguf_{kind}": entry for kind, entry in summary.get("quantized", {}).items()})  # model-TYPE.gguf
    for fmt, entry in files.items():
        key = f"pruneflow.model.export.{fmt}"
        if key not in tags:
            target, rel = export_dir / entry["path"], f"export/{entry['path']}"
            if target.is_dir():
                client.log_artifacts(run_id, str(target), rel)
            else:
                client.log_artifact(run_id, str(target), "export")
            tags[key] = f"runs:/{run_id}/{rel}"
            client.set_model_version_tag(name, str(version.version), key, tags[key])
        out[fmt] = tags[key]
    return out


def _dir_md5(workspace: Path, model_dir: Path) -> str:
    """The model directory's hash as dvc.lock records it (the same model has the same hash on every run)."""
    from pruneflow.tasks.stage import locked_outputs

    rel = model_dir.relative_to(workspace).as_posix()
    return next((md5 for stage in ("recover", "prune") for path, md5 in locked_outputs(workspace, stage).items()
                 if path == rel and md5), "")


def _registered(client, name: str, digest: str):
    """The version of ``name`` already holding this exact model (a cached re-run registers nothing new)."""
    if not digest:
        return None
    found = client.search_model_versions(f"name = '{name}' and tags.`pruneflow.model_md5` = '{digest}'")
    return found[0] if found else None


def _log_and_register(client, repo: str, run_id: str, name: str, model_dir: Path, vanilla: bool):
    import mlflow

    if vanilla:
        mlflow.set_tracking_uri(tracking_uri(Path(repo)))
        from pruneflow import load

        # a loaded model, not the directory: MLflow 3.17's from-path mode reads transformers 5's lazy pipeline
        # registry as classes and fails ('str' object has no attribute '__name__')
        model, tokenizer, _ = load(model_dir)
        active = mlflow.active_run()  # the flow's system-metrics context may already hold this run
        with nullcontext() if active and active.info.run_id == run_id else mlflow.start_run(run_id=run_id):
            info = mlflow.transformers.log_model(transformers_model={"model": model, "tokenizer": tokenizer},
                                                 name="model", task="text-generation",
                                                 pip_requirements=["transformers", "torch", "safetensors"])
        return mlflow.register_model(info.model_uri, name)
    # per-layer widths: the directory, loadable with pruneflow.load or trust_remote_code
    client.log_artifacts(run_id, str(model_dir), "model")
    return _register_directory(client, name, run_id)


RACES = ("UNIQUE constraint failed", "IntegrityError", "RESOURCE_ALREADY_EXISTS", "already exists")


def set_alias(client, name: str, alias: str, version, tries: int = 5) -> None:
    """Point ``alias`` at ``version``. Two runs of a sweep registering at once can both find the alias missing
    and both insert it; the store refuses the second (a unique constraint). The alias then exists, so setting it
    again updates it: last writer wins, as for one writer."""
    from mlflow.exceptions import MlflowException

    for attempt in range(tries):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as err:
            if attempt == tries - 1 or not any(text in str(err) for text in RACES):
                raise
            time.sleep(0.2 * (attempt + 1))


def _register_directory(client, name: str, run_id: str):
    from mlflow.exceptions import MlflowException

    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        try:
            client.create_registered_model(name)
        except MlflowException as err:  # another run of a sweep created it meanwhile
            if not any(text in str(err) for text in RACES):
                raise
    return client.create_model_version(name, source=client.get_run(run_id).info.artifact_uri + "/model",
                                       run_id=run_id)


def finish(repo: str, run_id: str, status: str) -> None:
    _client(Path(repo)).set_terminated(run_id, status=status)


def _metrics_artifact(client, run_id: str) -> dict:
    """The metrics.json a pipeline run logged (register_model logs it to the parent run)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, "metrics.json", tmp)).read_text())


def run_metrics(repo: str, flow_run_id: str) -> dict | None:
    """metrics.json of the pipeline run that Prefect flow run ``flow_run_id`` tracked (None if not found)."""
    client = _client(Path(repo))
    found = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([found.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'") if found else []
    return _metrics_artifact(client, runs[0].info.run_id) if runs else None


@task(name="track-sweep", cache_policy=NO_CACHE)
def log_sweep(repo: str, name: str, table: str, members: dict[str, dict], tags: dict[str, str]) -> str:
    """One MLflow run for a sweep: the comparison table as comparison.md, each member's final ppl as a metric."""
    client = _client(Path(repo))
    run = client.create_run(_experiment(client, Path(repo)), run_name=name, tags={"pruneflow.kind": "sweep", **tags})
    client.log_text(run.info.run_id, table, "comparison.md")
    client.log_dict(run.info.run_id, members, "members.json")
    _log_metrics(client, run.info.run_id, {f"{label}.ppl_ratio": m["ppl_ratio"] for label, m in members.items()
                                           if isinstance(m.get("ppl_ratio"), (int, float))})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def metrics_by_run(repo: str, names: list[str] | None = None) -> tuple[dict[str, dict], list[str]]:
    """({run name: metrics.json}, names of runs skipped) of pipeline runs, by run name or id (all finished
    pipeline runs if none named). A run without metrics.json (it never reached evaluate) is skipped when not
    named and an error when named; any other failure to read a run (the server, the artifact store, a corrupt
    file) is an error naming the run and the cause, never a silent skip."""
    from pruneflow.errors import PruneflowError

    store = Path(repo).resolve() / "mlflow.db"
    if not os.environ.get("MLFLOW_TRACKING_URI") and not store.is_file():  # opening it would create it
        named = f"{', '.join(names)}: no such metrics.json file or directory, and " if names else ""
        raise PruneflowError(f"{named}no MLflow store at {store} (MLFLOW_TRACKING_URI is unset): run the pipeline "
                             f"in this checkout first, or give --repo the checkout that ran it")
    client = _client(Path(repo))
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is None:
        raise PruneflowError(f"no MLflow experiment {EXPERIMENT!r} at {tracking_uri(Path(repo))}")
    runs = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'", order_by=["start_time ASC"])
    runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("pruneflow.kind") != "sweep"]
    if names:
        by_key = {key: r for r in runs for key in (r.info.run_name, r.info.run_id)}
        missing = [n for n in names if n not in by_key]
        if missing:
            raise PruneflowError(f"no finished pipeline run named {', '.join(missing)} in MLflow")
        runs = [by_key[n] for n in names]
    out, skipped = {}, []
    for r in runs:
        what = f"MLflow run {r.info.run_name} ({r.info.run_id})"
        try:
            logged = {a.path for a in client.list_artifacts(r.info.run_id)}
            if "metrics.json" not in logged:
                if names:
                    raise PruneflowError(f"{what} has no metrics.json: it never reached the evaluate stage")
                skipped.append(r.info.run_name)
                continue
            out[r.info.run_name] = _metrics_artifact(client, r.info.run_id)
        except PruneflowError:
            raise
        except json.JSONDecodeError as err:
            raise PruneflowError(f"{what}: its metrics.json is not valid JSON ({err})") from None
        except Exception as err:  # noqa: BLE001 - the server, the store or the network: said, with the cause
            raise PruneflowError(f"cannot read the metrics of {what}: {type(err).__name__}: {err}") from None
    return out, skipped
