"""Commands on the pipeline: a stage, a run of the flow, serving and deploying flows, sweeps, reports."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import typer

from pruneflow.errors import PruneflowError
from pruneflow.cli.common import (_quiet_libraries, _fail, _exit_if_prefect_lost, _prefect_checks, _step, _table, app)


@app.command()
def stage(
    name: str = typer.Argument(..., help="source | calibrate | score | prune | recover | evaluate | export"),
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="parameters"),
    overrides: list[str] = typer.Option([], "--set", help="override a parameter: section.key=value"),
    artifacts: Path = typer.Option(Path("artifacts"), help="the artifacts directory stages read and write"),
) -> None:
    """Run one pipeline stage (as dvc.yaml declares them) on its fixed inputs and outputs under ARTIFACTS."""
    from pruneflow.pipeline import stages
    from pruneflow.pipeline.params import load_params

    try:
        params = load_params(params_file, overrides)
        _quiet_libraries()
        _step(f"stage {name}")
        started = time.perf_counter()
        out = stages.run(name, params, artifacts)
    except PruneflowError as err:
        _fail(err)
    _step(f"stage {name} wrote {out} in {time.perf_counter() - started:.1f} s")


@app.command("run")
def run_pipeline(
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="parameters"),
    overrides: list[str] = typer.Option([], "--set", help="override a parameter: section.key=value"),
    name: Optional[str] = typer.Option(None, help="run (and DVC experiment) name"),
) -> None:
    """Run the pipeline flow (dvc.yaml's stages as Prefect tasks). Params equal to params.yaml run in place;
    others run in an isolated worktree and are saved as a DVC experiment."""
    from pruneflow.tasks import server

    temporary = server.start()  # no Prefect server configured: boot the temporary one while the rest loads
    try:
        from pruneflow.flows.pipeline import pipeline
        from pruneflow.pipeline.params import load_params
        from pruneflow.pipeline.stages import check_fits
        from pruneflow.tasks.stage import StageFailed, warm_up
        from pruneflow.tasks.workspace import repo_root

        try:
            params = load_params(params_file, overrides)
            repo = repo_root(params_file.resolve().parent)
            check_fits(params, repo)  # what the flow's preflight refuses, said here with no flow run or traceback
            logging.basicConfig(level=logging.INFO, format="%(message)s")  # the stages run (and quiet) elsewhere
            warm_up(repo)  # the flow's libraries (MLflow, DVC) and the tracking store load while the server boots
            if temporary is not None and temporary.wanted():
                from prefect.settings import PREFECT_API_URL, temporary_settings

                with temporary_settings(updates={PREFECT_API_URL: temporary.ready()}):
                    result = pipeline(params=params, repo=str(repo), run_name=name)
            else:
                _prefect_checks()
                result = pipeline(params=params, repo=str(repo), run_name=name)
        except (PruneflowError, StageFailed) as err:
            _fail(err)
        except Exception as err:
            if temporary is not None:
                temporary.stop()  # _exit_if_prefect_lost ends the process at once
            _exit_if_prefect_lost(err)
            raise
    finally:
        if temporary is not None:
            temporary.stop()
    stages = ", ".join(f"{s['stage']} ({'cached' if s['cached'] else 'ran'})" for s in result["stages"])
    _step(f"{result['run']}: {stages}" + (f"; saved as DVC experiment {result['experiment']}"
                                          if result["experiment"] else ""))
    m = result["metrics"]
    _table(f"{m['method']} −{m['achieved_ratio']:.1%}",
           {name: m[name] for name in ("dense", "pruned", "recovered") if name in m})
    gates = ", ".join(f"{k} {'pass' if g['passed'] else 'FAIL'}" for k, g in m["gates"].items())
    _step(f"gates: {gates}; registered {result['model']['name']} v{result['model']['version']} as candidate"
          + (" and champion" if result["model"]["champion"] else ""))


@app.command()
def serve(
    names: list[str] = typer.Option([], "--name", help="deployments of prefect.yaml to serve (default: all)"),
    repo: Path = typer.Option(Path("."), help="the checkout whose params.yaml fills the parameter forms"),
    limit: Optional[int] = typer.Option(None, help="flow runs at once in this process"),
    no_schedules: bool = typer.Option(False, "--no-schedules", help="serve without prefect.yaml's schedules"),
) -> None:
    """Serve prefect.yaml's deployments from this process (cron schedules included) until Ctrl-C;
    trigger them from the Prefect UI form or the API. Needs PREFECT_API_URL (e.g. from `pruneflow up`)."""
    from pruneflow.flows import deployments
    from pruneflow.tasks.workspace import repo_root

    from pruneflow.tasks.remote import check_prefect_api

    try:
        root = repo_root(repo.resolve())
        check_prefect_api(needed_by="pruneflow serve")
        _quiet_libraries()
        deployments.serve(root, names or None, limit, schedules=not no_schedules)
    except PruneflowError as err:
        _fail(err)


@app.command()
def deploy(
    pool: Optional[str] = typer.Option(None, help="work pool (default: each deployment's work_pool.name)"),
    names: list[str] = typer.Option([], "--name", help="deployments of prefect.yaml (default: all)"),
    repo: Path = typer.Option(Path("."), help="the checkout the runs work in (params.yaml fills the forms)"),
) -> None:
    """Register prefect.yaml's deployments on a work pool (created as a process pool if it does not exist); run
    them with `prefect worker start --pool POOL`."""
    from pruneflow.flows import deployments
    from pruneflow.tasks.workspace import repo_root

    from pruneflow.tasks.remote import check_prefect_api

    try:
        root = repo_root(repo.resolve())
        check_prefect_api(needed_by="pruneflow deploy")
        _quiet_libraries()
        ids = deployments.deploy(root, pool, names or None, on_created=lambda name: _step(
            f"created work pool {name!r} (type process); start its workers with `prefect worker start --pool "
            f"{name}`"))
    except PruneflowError as err:
        _fail(err)
    _step(f"registered {len(ids)} deployment(s): {', '.join(ids)}")


@app.command()
def sweep(
    methods: str = typer.Option("flap,wanda_sp", help="comma-separated methods"),
    ratios: str = typer.Option("0.2,0.3", help="comma-separated ratios"),
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="the base parameters"),
    overrides: list[str] = typer.Option([], "--set", help="override a base parameter: section.key=value"),
    deployment: str = typer.Option("pruneflow/pruneflow", help="the pipeline deployment the points run on"),
    name: Optional[str] = typer.Option(None, help="sweep name (MLflow run, Prefect artifact, experiment prefix)"),
) -> None:
    """Run methods × ratios as separate runs of the pipeline deployment (its pool's workers set the
    parallelism), then print one comparison table (also a Prefect artifact and an MLflow run)."""
    from pruneflow.flows.sweep import grid, sweep as sweep_flow
    from pruneflow.pipeline.params import load_params
    from pruneflow.tasks.workspace import repo_root

    try:
        params = load_params(params_file, overrides)
        method_list = [m.strip() for m in methods.split(",") if m.strip()]
        try:
            ratio_values = [float(r) for r in ratios.split(",") if r.strip()]
        except ValueError:
            raise PruneflowError(f"--ratios {ratios!r}: comma-separated numbers, e.g. 0.2,0.3") from None
        grid(params, method_list, ratio_values)  # every point, before a flow run starts (the flow checks again)
        repo = repo_root(params_file.resolve().parent)
        _prefect_checks(needed_by="pruneflow sweep")
        result = sweep_flow(methods=method_list, ratios=ratio_values, params=params, repo=str(repo),
                            deployment=deployment, name=name)
    except (PruneflowError, ValueError, RuntimeError) as err:
        _fail(err)
    except Exception as err:
        _exit_if_prefect_lost(err)
        raise
    typer.echo(result["table"])
    _step(f"{result['name']}: {len(result['members'])} points in {result['seconds']:.0f} s")


@app.command()
def report(
    runs: list[str] = typer.Argument(None, help="metrics.json files (or dirs holding one), or MLflow run names/ids"),
    out: Path = typer.Option(Path("artifacts/comparison"), help="directory for report.md and the plots (replaced)"),
    repo: Path = typer.Option(Path("."), help="the checkout whose MLflow store (mlflow.db) is read when "
                                              "MLFLOW_TRACKING_URI is unset"),
) -> None:
    """Compare runs: one table (dense once, then each run's pruned/recovered rows and task scores) and
    perplexity vs parameters (Pareto frontier per method). Local files, or MLflow runs (all if none named)."""
    from pruneflow.atomic import atomic_dir
    from pruneflow.evaluation.report import run_table, task_table, write_report

    try:
        local = [r for r in runs or [] if Path(r).exists()]
        if local and len(local) != len(runs):
            raise PruneflowError("give either metrics.json paths or MLflow run names, not both")
        if local:
            files = [Path(r) / "metrics.json" if Path(r).is_dir() else Path(r) for r in local]
            labels = [f.parent.name if f.name == "metrics.json" else f.stem for f in files]
            labels = labels if len(set(labels)) == len(labels) else [str(f) for f in files]
            loaded = {}
            for label, f in zip(labels, files):
                if not f.is_file():
                    raise PruneflowError(f"{f} not found")
                try:
                    loaded[label] = json.loads(f.read_text())
                except json.JSONDecodeError as err:
                    raise PruneflowError(f"{f} is not valid JSON: {err}") from None
        else:
            from pruneflow.tasks.tracking import metrics_by_run

            loaded, skipped = metrics_by_run(str(repo.resolve()), runs or None)
            if skipped:
                _step(f"skipped {len(skipped)} run(s) that never reached the evaluate stage (no metrics.json): "
                      f"{', '.join(skipped)}")
        if not loaded:
            raise PruneflowError("no runs with metrics to compare")
        with atomic_dir(out, overwrite=True) as tmp:
            write_report(tmp, loaded)
    except PruneflowError as err:
        _fail(err)
    typer.echo(run_table(loaded) + task_table(loaded))
    _step(f"report: {out / 'report.md'}, {out / 'ppl_vs_params.png'}")


