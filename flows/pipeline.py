"""The pipeline flow: the stages of dvc.yaml, in its order, each a Prefect task running `dvc repro`.

dvc.yaml stays the only stage graph; this flow adds the Prefect side (UI form from the params model,
per-stage states, retries, schedules) and chooses where the run happens (tasks.workspace).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import yaml
from prefect import flow
from prefect.runtime import flow_run

from pruneflow.params import Params, load_params
from tasks.stage import run_stage
from tasks.workspace import close_workspace, code_version, exclusive, open_workspace, save_experiment


def stage_names(workspace: Path) -> list[str]:
    return list(yaml.safe_load((workspace / "dvc.yaml").read_text())["stages"])


@flow(name="pruneflow", log_prints=True)
def pipeline(params: Params = Params(), repo: str = ".", run_name: str | None = None) -> dict:
    """Prune with ``params``: calibrate → score → prune → evaluate, unchanged stages served from DVC's cache."""
    run_name = run_name or f"run-{flow_run.get_name() or 'local'}"
    repo_path = Path(repo).resolve()
    in_place = load_params(repo_path / "params.yaml") == params
    with exclusive(repo_path) if in_place else nullcontext():
        workspace = open_workspace(str(repo_path), params, run_name)
        try:
            path = Path(workspace["path"])
            stage = run_stage.with_options()
            stage.version = code_version(repo_path)  # the commit the stage code comes from (no with_options key)
            stages = [stage(name, str(path), return_state=True).result() for name in stage_names(path)]
            metrics = json.loads((path / "artifacts" / "metrics.json").read_text())
            experiment = save_experiment(workspace, run_name) if workspace["isolated"] else None
        finally:
            close_workspace(str(repo_path), workspace)
    return {"run": run_name, "workspace": "isolated" if workspace["isolated"] else str(repo_path),
            "experiment": experiment, "stages": stages, "metrics": metrics}
