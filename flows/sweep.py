"""The sweep flow: a grid of methods × ratios, each point a separate run of the pipeline deployment.

Points run as their own flow runs on the deployment's work pool (run_deployment, linked here as subflows), so
the pool's workers set the parallelism; each point is an override run, i.e. isolated and saved as a DVC
experiment. At the end one comparison table (Prefect markdown artifact + MLflow run) is built from the points'
metrics in MLflow.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from pruneflow.errors import PruneflowError
from pruneflow.pipeline.params import Params, validate
from pruneflow.evaluation.report import run_table, task_table
from pruneflow.tasks import tracking
from pruneflow.tasks.remote import record_process

DEPLOYMENT = "pruneflow/pruneflow"  # flow name / deployment name, as `pruneflow deploy` creates it


def grid(params: Params, methods: list[str], ratios: list[float]) -> dict[str, Params]:
    """{label: params} for every point, validated before anything is launched."""
    if not methods or not ratios:
        raise PruneflowError("a sweep needs at least one method and one ratio")
    points = {}
    for method in methods:
        for ratio in ratios:
            data = params.model_dump()
            data["score"]["method"], data["prune"]["ratio"] = method, ratio
            points[f"{method}-{ratio:g}"] = validate(Params, data, prefix=f"sweep[{method}, {ratio}]")
    return points


@task(name="sweep-point", task_run_name="{label}", cache_policy=NO_CACHE)
def run_point(deployment: str, label: str, params: Params, repo: str, run_name: str) -> str:
    """Run one point as a deployment flow run and wait for it; returns its flow-run id."""
    run = run_deployment(deployment, parameters={"params": params.model_dump(), "repo": repo, "run_name": run_name},
                         flow_run_name=run_name, poll_interval=2)
    if not run.state or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise RuntimeError(f"sweep point {label} ({run_name}) ended {state}: {run.state.message if run.state else ''}")
    return str(run.id)


@flow(name="pruneflow-sweep", log_prints=True)
def sweep(methods: list[str] = ["flap", "wanda_sp"], ratios: list[float] = [0.2, 0.3],  # noqa: B006 - Prefect params
          params: Params = Params(), repo: str = ".", deployment: str = DEPLOYMENT, name: str | None = None) -> dict:
    """Prune with every (method, ratio) on ``deployment``'s workers; one comparison table at the end."""
    logger = get_run_logger()
    record_process()  # so a later run can tell if this one died
    name = name or f"sweep-{flow_run.get_name() or time.strftime('%Y%m%d-%H%M%S')}"
    points = grid(params, methods, ratios)
    started = time.perf_counter()
    futures = {label: run_point.submit(deployment, label, point, repo, f"{name}-{label}")
               for label, point in points.items()}
    members, failed = {}, {}
    for label, future in futures.items():
        future.wait()
        state = future.state
        if not state.is_completed():
            failed[label] = state.message or state.name
        elif (metrics := tracking.run_metrics(repo, future.result())) is None:
            failed[label] = f"flow run {future.result()} completed but no MLflow run of it has metrics.json"
        else:
            members[label] = metrics
    seconds = time.perf_counter() - started
    table = run_table(members) + task_table(members)
    if failed:
        table += "\nFailed points: " + "; ".join(f"{k}: {v}" for k, v in failed.items()) + "\n"
    create_markdown_artifact(markdown=f"# {name}\n\n{len(points)} points in {seconds:.0f} s\n\n{table}",
                             key="sweep-comparison", description=f"pruneflow sweep {name}")
    run_id = tracking.log_sweep(repo, name, table, members, {"prefect.flow_run_id": str(flow_run.get_id() or "")})
    logger.info("sweep %s: %d/%d points in %.0f s\n%s", name, len(members), len(points), seconds, table)
    if failed:
        raise RuntimeError(f"sweep {name}: {len(failed)} of {len(points)} points failed: {', '.join(failed)}")
    return {"name": name, "seconds": seconds, "table": table, "members": members, "mlflow_run_id": run_id}
