"""What every command shares: the Typer apps, clear errors (exit 2), progress lines and tables."""

from __future__ import annotations

import logging
import os
import sys

import typer


app = typer.Typer(add_completion=False, no_args_is_help=True, help="Structured pruning of LLMs.")
reference_app = typer.Typer(no_args_is_help=True, help="The embedded reference model.")
corpus_app = typer.Typer(no_args_is_help=True, help="The packaged public-text corpus.")
export_app = typer.Typer(no_args_is_help=True, help="Write a checkpoint in a serving engine's format.")
app.add_typer(reference_app, name="reference")
app.add_typer(corpus_app, name="corpus")
app.add_typer(export_app, name="export")



def _quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("datasets").setLevel(logging.ERROR)  # "using the latest cached version" on every offline read
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer's plan names the temporary file, not the output
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _exit_if_prefect_lost(err: Exception) -> None:
    """If ``err`` is Prefect's client giving up on its API (after its own bounded retries: a transport error or
    a 5xx), say so and exit at once. A normal exit would wait for Prefect's event and log queues to drain to the
    dead server (7 s per queued event: minutes); what they hold is only for that server, and the run's own
    results are on disk already (DVC outputs, the MLflow run). Any other error: return."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    if not (isinstance(err, httpx.TransportError) or
            (isinstance(err, PrefectHTTPStatusError) and err.response.status_code >= 500)):
        return
    url = getattr(getattr(err, "request", None), "url", None) or os.environ.get("PREFECT_API_URL", "?")
    typer.secho(f"error: the Prefect API stopped answering during the run ({type(err).__name__}: {err}; at {url}). "
                f"Every stage that finished is kept and is not recomputed: restart the server "
                f"(`pruneflow up`) and run again", fg=typer.colors.RED, err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)


def _prefect_checks(needed_by: str | None = None) -> None:
    """Before a flow: the Prefect API must answer (and be set, for ``needed_by``: see ``check_prefect_api``);
    flow runs of this host whose process died unreported are marked Crashed (a failure there only warns: it
    must not stop the run)."""
    from pruneflow.tasks.remote import check_prefect_api, mark_orphaned_runs

    check_prefect_api(needed_by=needed_by)
    if not os.environ.get("PREFECT_API_URL"):
        return  # a temporary server: a fresh database
    try:
        marked = mark_orphaned_runs()
    except Exception as err:  # noqa: BLE001
        typer.secho(f"warning: could not look for orphaned flow runs ({err})", fg=typer.colors.YELLOW, err=True)
        return
    if marked:
        _step(f"marked {len(marked)} flow run(s) whose process had ended as Crashed: {', '.join(marked)}")


def _step(text: str) -> None:
    typer.secho(f"» {text}", fg=typer.colors.CYAN, err=True)


def _table(title: str, columns: dict[str, dict]) -> None:
    """One column per model (or before/after), one row per metric: stays readable in 80 columns."""
    from rich.console import Console
    from rich.table import Table

    columns = {name: _flat(column) for name, column in columns.items()}
    metrics = list(dict.fromkeys(k for column in columns.values() for k in column))
    table = Table(title=title)
    table.add_column("")
    for name in columns:
        table.add_column(name, justify="right")
    for metric in metrics:
        table.add_row(metric, *(_fmt(column.get(metric)) for column in columns.values()))
    Console().print(table)


def _flat(row: dict) -> dict:
    """Nested values (a model's task scores) as their own rows: {"tasks": {"a": 1}} → {"tasks.a": 1}."""
    out = {}
    for key, value in row.items():
        out |= {f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value}
    return out


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 else f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _text_title(ev) -> str:
    where = "the packaged corpus's test split" if ev.source == "corpus" else ev.source
    return f"perplexity on {where}, {ev.ppl_seqlen}-token windows"


DEVICE_HELP = "auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps"
DTYPE_HELP = "auto (the checkpoint's own) | bfloat16 | float16 | float32; checkpoints are saved in the input's dtype"


