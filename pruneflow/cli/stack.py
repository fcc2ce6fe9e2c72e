"""Commands on the local stack: up, status, down."""

from __future__ import annotations

from pathlib import Path

import typer

from pruneflow.errors import PruneflowError
from pruneflow.cli.common import (_fail, _step, app)


STACK_DIR = Path(".pruneflow/stack")


UIS = {"mlflow": "MLflow UI", "prefect": "Prefect UI"}


def _services(state: dict) -> None:
    """A line per service, URLs whole (a table would cut them to fit 80 columns)."""
    for name, s in state.items():
        health = "" if "healthy" not in s else ("  healthy" if s["healthy"] else "  NOT ANSWERING")
        ui = f"  ({UIS[name]})" if name in UIS else (f"  (dashboard {s['dashboard']})" if "dashboard" in s else "")
        typer.echo(f"{name:8} {s['url']}{ui}  pid {s['pid']}{health}  log {s['log']}")


@app.command()
def up(
    run_dir: Path = typer.Option(STACK_DIR, help="data, logs and stack.json of the local stack"),
    s3_port: int = typer.Option(8333, help="SeaweedFS S3 port"),
    mlflow_port: int = typer.Option(5000, help="MLflow server port"),
    prefect_port: int = typer.Option(4200, help="Prefect server port"),
    timeout: float = typer.Option(120, help="seconds each service may take to answer its health check"),
    ray: bool = typer.Option(False, "--ray", help="also start a Ray head (token auth on) for --workers"),
    ray_client_port: int = typer.Option(10001, help="the Ray head's Ray Client port (RAY_ADDRESS=ray://…)"),
) -> None:
    """Start SeaweedFS (S3, your AWS_* credentials enforced), MLflow and Prefect servers on 127.0.0.1; with
    --ray a Ray head too."""
    from pruneflow.infra import stack

    try:
        _step(f"starting the local stack in {run_dir}")
        ports = {"s3": s3_port, "mlflow": mlflow_port, "prefect": prefect_port}
        state = stack.up(run_dir, {**ports, **({"ray-client": ray_client_port} if ray else {})}, timeout, ray=ray)
    except PruneflowError as err:
        _fail(err)
    _services(state)
    typer.echo("use it from this shell:\n" + "\n".join(f"export {k}={v}" for k, v in stack.client_env(state).items()))


@app.command()
def status(run_dir: Path = typer.Option(STACK_DIR, help="the local stack's run directory")) -> None:
    """Is each service of the local stack alive and answering its health check? Exit 1 if not."""
    from pruneflow.infra import stack

    state = stack.status(run_dir)
    if not state:
        typer.echo(f"no local stack in {run_dir} (`pruneflow up`)")
        raise typer.Exit(1)
    _services(state)
    if not all(s["healthy"] for s in state.values()):
        raise typer.Exit(1)


@app.command()
def down(run_dir: Path = typer.Option(STACK_DIR, help="the local stack's run directory")) -> None:
    """Stop the local stack (data and logs stay in RUN_DIR)."""
    from pruneflow.infra import stack

    if (run_dir / "stack.json").exists():
        _step(f"stopping the stack in {run_dir} (SeaweedFS takes about 15 s)")
    stopped = stack.down(run_dir)
    _step(f"stopped {', '.join(stopped)}" if stopped else f"no local stack in {run_dir}")


