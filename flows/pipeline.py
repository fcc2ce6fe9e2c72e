"""The pipeline flow: the stages of dvc.yaml, in its order, each a Prefect task running `dvc repro`.

dvc.yaml stays the only stage graph; this flow adds the Prefect side (UI form from the params model,
per-stage states, retries, schedules) and chooses where the run happens (tasks.workspace).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import yaml
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from pruneflow.errors import PruneflowError
from pruneflow.pipeline.params import Params, load_params
from pruneflow.pipeline.graph import STAGES
from pruneflow.evaluation.report import run_table
from pruneflow.tasks import tracking
from pruneflow.tasks.remote import check_tracking_uri, preflight, push, record_process
from pruneflow.tasks.stage import dvc_status, report_failures_without_traceback, run_stage, up_to_date
from pruneflow.tasks.workspace import close_workspace, code_version, exclusive, open_workspace, save_experiment


def stage_names(workspace: Path) -> list[str]:
    """dvc.yaml's stages, checked against the library's: a stage edited out of sync fails before any work."""
    path = workspace / "dvc.yaml"
    try:
        stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError) as err:
        raise PruneflowError(f"cannot read {path}: {err}") from None
    commands = {name: str(stage.get("cmd", "")).split()[:3] for name, stage in stages.items()}
    wrong = [name for name, cmd in commands.items() if cmd != ["pruneflow", "stage", name]]
    if list(stages) != list(STAGES) or wrong:
        raise PruneflowError(f"{path} is out of sync with this pruneflow: expected the stages {', '.join(STAGES)} "
                             f"in that order, each running `pruneflow stage NAME`; found {', '.join(stages) or 'none'}"
                             + (f" (wrong cmd: {', '.join(wrong)})" if wrong else ""))
    return list(stages)


@flow(name="pruneflow", log_prints=True)
def pipeline(params: Params = Params(), repo: str = ".", run_name: str | None = None) -> dict:
    """Prune with ``params``: source → calibrate → score → prune → recover → evaluate, unchanged stages served
    from DVC's cache; tracked in MLflow, outputs pushed to the DVC remote, a report published as an artifact."""
    run_name = run_name or f"run-{flow_run.get_name() or 'local'}"
    report_failures_without_traceback()
    record_process()  # so a later run can tell if this one died
    repo_path = Path(repo).resolve()
    stage_names(repo_path)  # a dvc.yaml out of sync with the code fails before any work
    check_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", ""))  # a malformed URI: no retries, no work
    version = code_version(repo_path)
    from pruneflow.pipeline.stages import check_fits

    check_fits(params, repo_path)  # every stage can stream where it must, and the prune's plan fits: before any work
    preflight(str(repo_path))
    in_place = load_params(repo_path / "params.yaml") == params
    with exclusive(repo_path) if in_place else nullcontext():  # a second in-place run stops here, at once
        return _run(params, repo_path, run_name, version)


def _run(params: Params, repo_path: Path, run_name: str, version: str) -> dict:
    run_id = tracking.start_run(str(repo_path), params.model_dump(), run_name, {
        "pruneflow.code_version": version, "prefect.flow_run_id": str(flow_run.get_id() or "")})
    status = "FAILED"
    with tracking.system_metrics(str(repo_path), run_id):
        workspace = open_workspace(str(repo_path), params, run_name)
        try:
            path = Path(workspace["path"])
            stage = run_stage.with_options()
            stage.version = version  # the commit the stage code comes from (no with_options key for it)
            stages = []
            # the main checkout's state dir: a crashed isolated Bonsai run resumes although its worktree is gone
            state = str(repo_path / "artifacts" / ".state")
            changed = None  # DVC's status of the stages, asked again after any stage ran
            for name in stage_names(path):
                started = time.perf_counter()
                changed = dvc_status(str(path)) if changed is None else changed
                skip = up_to_date(name, str(path), changed, state)
                stages.append(stage(name, str(path), state, skip, return_state=True).result())
                changed = changed if skip else None
                tracking.log_stage(str(repo_path), run_id, stages[-1], str(path), time.perf_counter() - started)
            metrics = json.loads((path / "artifacts" / "metrics.json").read_text())
            report = path / "artifacts" / "report" / "report.md"
            table = report.read_text().split("\n![")[0] if report.exists() else run_table({run_name: metrics})
            create_markdown_artifact(markdown=f"# {run_name}\n\n{table}", key="pruneflow-report",
                                     description=f"dense vs pruned vs recovered, {run_name}")
            name = Path(params.model.partition("@")[0]).name  # a hub id's revision is no part of the name
            model = tracking.register_model(str(repo_path), run_id, str(path), f"{name}-pruned")
            remote = push(workspace)
            experiment = save_experiment(workspace, run_name) if workspace["isolated"] else None
            status = "FINISHED"
        finally:
            close_workspace(str(repo_path), workspace)
            tracking.finish(str(repo_path), run_id, status)
    return {"run": run_name, "workspace": "isolated" if workspace["isolated"] else str(repo_path),
            "experiment": experiment, "stages": stages, "metrics": metrics, "mlflow_run_id": run_id,
            "model": model, "pushed_to": remote}
