"""The ``pruneflow`` command line: typed functions, one per command."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from pruneflow.errors import PruneflowError

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


def _prefect_checks() -> None:
    """Before a flow: the Prefect API must answer; flow runs of this host whose process died unreported are
    marked Crashed (a failure there only warns: it must not stop the run)."""
    from pruneflow.tasks.remote import check_prefect_api, mark_orphaned_runs

    check_prefect_api()
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


def _check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise PruneflowError(f"output directory {out} already exists; choose another or pass --force")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise PruneflowError(f"output location {parent} is not a writable directory")
    try:  # os.access says yes to root everywhere; creating something is the real test (before any work)
        os.rmdir(tempfile.mkdtemp(prefix=".pruneflow-probe-", dir=parent))
    except OSError as err:
        raise PruneflowError(f"output location {parent} is not a writable directory ({err.strerror})") from None


DEVICE_HELP = "auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps"
DTYPE_HELP = "auto (the checkpoint's own) | bfloat16 | float16 | float32; checkpoints are saved in the input's dtype"


@app.command()
def prune(
    model_dir: str = typer.Argument(..., help="checkpoint to prune: a directory (safetensors + config) or a hub "
                                              "id ORG/NAME[@REVISION]"),
    out: Optional[Path] = typer.Option(None, "--out", help="where to write the pruned checkpoint (must not exist)"),
    method: Optional[str] = typer.Option(None, help="importance method; see `pruneflow methods`"),
    ratio: Optional[float] = typer.Option(None, help="fraction of non-embedding parameters to remove"),
    calibration: Optional[str] = typer.Option(None, help="'corpus', a .txt/.jsonl file, or hf:NAME"),
    units: Optional[str] = typer.Option(None, help="comma-separated: heads,channels | layers | hidden | experts"),
    allocation: Optional[str] = typer.Option(None, help="uniform | global | search (per-layer counts searched on calibration loss) | auto"),
    head_mode: Optional[str] = typer.Option(None, help="auto | query (a head from every KV group) | group (whole KV groups)"),
    round_to: Optional[int] = typer.Option(None, help="keep MLP widths a multiple of N"),
    seed: Optional[int] = typer.Option(None, help="seed for calibration sampling and random scores"),
    n_calibration: Optional[int] = typer.Option(None, help="calibration windows"),
    seqlen: Optional[int] = typer.Option(None, help="calibration window length"),
    reconstruct: Optional[str] = typer.Option(
        None, help="none | bias (FLAP's compensation) | lstsq (re-fit o_proj/down_proj to the dense outputs) | "
                   "auto (the method's own)"),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    max_shard_size: str = typer.Option("5GB", help="largest safetensors file written (bigger weights are sharded)"),
    max_memory: Optional[str] = typer.Option(
        None, help="memory budget (e.g. 512MiB, 20GiB): a model whose weights exceed it is streamed a block at a "
                   "time by the methods that stream (`pruneflow methods`) and the run holds at most this much at "
                   "once (blocks, activations, a chunk of logits, solves: see --dry-run)"),
    workers: Optional[str] = typer.Option(
        None, help="where candidate sub-models are evaluated: local | N (Ray workers; RAY_ADDRESS or a local "
                   "instance) | auto (a worker per GPU/CPU) | ray://HOST:PORT"),
    params_file: Optional[Path] = typer.Option(None, "--params", help="params.yaml for defaults"),
    overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE params override, e.g. score.bonsai.preset=fast"),
    state_dir: Optional[Path] = typer.Option(
        None, help="iterative methods: where completed iterations are kept for resume (default: .OUT.state beside OUT)"),
    force: bool = typer.Option(False, help="replace OUT if it exists"),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="print the plan of work from the config alone (no weight is read; a hub id "
                                 "fetches configs and tokenizer only): passes, tokens, bytes read and peak memory "
                                 "per phase, and whether it fits --device/--max-memory; exit 1 if it does not"),
) -> None:
    """Prune MODEL_DIR (a directory or hub id) and write a smaller checkpoint to OUT, then print a summary."""
    from pruneflow.params import load_params

    options = {"calibrate.source": calibration, "calibrate.seed": seed, "calibrate.n_windows": n_calibration,
               "calibrate.seqlen": seqlen, "score.method": method, "prune.ratio": ratio,
               "prune.units": units and units.split(","), "prune.allocation": allocation,
               "prune.head_mode": head_mode, "prune.round_to": round_to, "prune.reconstruct": reconstruct,
               "runtime.device": device, "runtime.dtype": dtype, "runtime.max_memory": max_memory, "runtime.workers": workers,
               "model": model_dir}
    try:
        params = load_params(params_file, overrides, updates={k: v for k, v in options.items() if v is not None})
        if dry_run:
            _quiet_libraries()
            fits = _dry_run(params)
        elif out is None:
            raise PruneflowError("missing option --out (where to write the pruned checkpoint), or use --dry-run")
    except PruneflowError as err:
        _fail(err)
    if dry_run:
        raise typer.Exit(0 if fits else 1)
    try:
        _check_out_dir(out, force)
        _quiet_libraries()
        summary = _prune(params, out, force, state_dir or out.parent / f".{out.name}.state", max_shard_size)
    except PruneflowError as err:
        _fail(err)
    _table(f"pruned {model_dir} → {out}", summary)


def _dry_run(params) -> bool:
    """Print the plan of work of ``params`` (pruneflow.execution.estimate); whether it fits."""
    from rich.console import Console
    from rich.table import Table

    from pruneflow import arch as A
    from pruneflow import checkpoint
    from pruneflow.execution.estimate import estimate
    from pruneflow.params import check_method
    from pruneflow.prune import check_model
    from pruneflow.runtime import Runtime
    from pruneflow.sizes import format_size
    from pruneflow.sources import resolve

    runtime = Runtime.from_params(params.runtime)
    method = params.score.method
    try:
        check_method(method, params.prune)
    except ValueError as err:
        raise PruneflowError(str(err)) from None
    source = resolve(params.model, weights=False)
    check_model(method, A.arch_for(checkpoint.read_config(source).get("model_type", "")))
    workers = int(runtime.workers) if runtime.workers.isdigit() else 1
    plan = estimate(source.path, params, runtime, workers)
    table = Table(title=f"dry run: {method} removing {params.prune.ratio:.0%} of {params.model} (per run of a phase)")
    for column in ("phase", "runs", "passes", "tokens", "read", "peak memory", "candidates"):
        table.add_column(column, justify="left" if column == "phase" else "right", no_wrap=True)
    for phase in plan.phases:
        table.add_row(phase.name, f"×{phase.repeat}", f"{phase.passes:,}", f"{phase.tokens:,}",
                      format_size(phase.read_bytes), format_size(phase.peak_bytes),
                      f"{phase.candidates:,}" if phase.candidates else "")
    console = Console(width=max(100, Console().width))
    console.print(table)
    mode = (f"streamed a block at a time under --max-memory {format_size(runtime.max_memory)}" if plan.streamed
            else "whole in memory")
    console.print(f"{plan.parameters:,} parameters, {format_size(plan.weight_bytes)} of {plan.dtype} weights, "
                  f"{mode}, on {runtime.device}; {sum(p.total('passes') for p in plan.phases):,} passes over the blocks, "
                  f"{format_size(sum(p.total('read_bytes') for p in plan.phases))} read in all")
    if runtime.workers != "local":
        candidates = [p for p in plan.phases if p.candidates]
        console.print(f"--workers {runtime.workers}: the candidate passes "
                      f"({sum(p.total('passes') for p in candidates):,}) split over "
                      f"{workers if runtime.workers.isdigit() else 'the cluster' + chr(39) + 's'} workers, each "
                      f"holding its own replica (the same peak memory per worker)")
    console.print(("fits: " if plan.fits else "does not fit: ") + plan.why)
    return plan.fits


def _prune(params, out: Path, force: bool, state_dir: Path | None = None,
           max_shard_size: str = "5GB") -> dict[str, dict]:
    from pruneflow import arch as A
    from pruneflow import calibration as C
    from pruneflow import checkpoint
    from pruneflow.methods import METHODS
    from pruneflow.prune import check_model, check_streams
    from pruneflow.prune import prune as run_prune
    from pruneflow.runtime import Runtime
    from pruneflow.sizes import format_size, parse_size
    from pruneflow.sources import resolve
    from pruneflow.stages import method_options

    started = time.perf_counter()
    runtime = Runtime.from_params(params.runtime)
    parse_size(max_shard_size)
    source = resolve(params.model)  # hub errors (not cached, gated, unknown revision) before any work
    method, c = params.score.method, params.calibrate
    check_model(method, A.arch_for(checkpoint.read_config(source).get("model_type", "")))
    stored = checkpoint.stored_dtype(source)
    _, weight_bytes = checkpoint.compute_size(source, runtime)
    if runtime.streams(weight_bytes):
        check_streams(method)
        _step(f"{format_size(weight_bytes)} of weights exceed --max-memory {format_size(runtime.max_memory)}: "
              f"streaming a block at a time")
    if runtime.workers != "local":
        _step(f"starting Ray workers ({runtime.workers})")
        from pruneflow.execution.replicas import pool_for

        pool_for(runtime)  # an unreachable cluster is an error before the model is read
    _step(f"loading {params.model} on {runtime}")
    model, tokenizer, spec = checkpoint.load(source, runtime, stream=METHODS[method].streams,
                                             calibration=(c.n_windows, c.seqlen), purpose=f"method {method}")
    _step(f"calibration: {c.n_windows} × {c.seqlen} tokens from {c.source}")
    windows, manifest = C.prepare(tokenizer, c.source, c.n_windows, c.seqlen, c.seed,
                                  getattr(model.config, "max_position_embeddings", None))
    resolved = params.prune.for_method(params.score.method)
    _step(f"scoring with {params.score.method}, removing {resolved.ratio:.0%} ({resolved.allocation})")
    runtime.reset_peak()
    result = run_prune(model, spec, params.score.method, params.prune, windows, seed=c.seed,
                       options=method_options(params), state_dir=state_dir, runtime=runtime)
    peak = runtime.peak_bytes()
    _step(f"saving {out}")
    saving = time.perf_counter()
    extra = {"plan.json": result.plan.to_json(), "calibration.json": json.dumps(manifest.__dict__, indent=1),
             "params.json": params.model_dump_json(indent=1)}
    if result.iterations:
        extra["iterations.json"] = json.dumps(result.iterations, indent=1)
    if result.search:
        extra["search.json"] = json.dumps(result.search, indent=1)
    if result.reconstruction:
        extra["reconstruction.json"] = json.dumps(result.reconstruction, indent=1)
    info = checkpoint.save(model, tokenizer, out, spec, overwrite=force, extra_files=extra, dtype=stored,
                           max_shard_size=max_shard_size, runtime=runtime)
    p = result.plan.params
    return {
        "before": {"parameters": p["total_before"], "non-embedding": p["non_embedding_before"],
                   "size MB": _size_mb(source.path)},
        "after": {"parameters": p["total_after"], "non-embedding": p["non_embedding_after"],
                  "size MB": _size_mb(out), "achieved ratio": p["achieved_ratio"],
                  "seconds": time.perf_counter() - started, "score seconds": result.seconds["score"],
                  "save seconds": time.perf_counter() - saving,
                  f"scoring peak MB ({peak['measure']})": peak["peak_bytes"] / 1e6,
                  **({"iterations": len(result.iterations)} if result.iterations else {}),
                  **({"search calibration loss": f"{result.search['start_loss']:.4f} → "
                                                 f"{result.search['best_loss']:.4f}"} if result.search else {}),
                  **({"lstsq relative error (mean)": _fit_summary(result.reconstruction)}
                     if result.reconstruction else {}),
                  "dtype": str(stored).removeprefix("torch."),
                  "loader": "vanilla" if info["vanilla"] else "per-layer (remote code)"},
    }


def _fit_summary(blocks: list[dict]) -> str:
    """Mean relative output error of the re-fitted projections: sliced dense weights → re-fitted."""
    def mean(key):
        return sum(b[name][key] for b in blocks for name in ("o", "down")) / (2 * len(blocks))
    return f"{mean('error_before'):.4f} → {mean('error_after'):.4f}"


def _size_mb(path: Path) -> float:
    from pruneflow.evaluate import size_on_disk

    return size_on_disk(path) / 1e6


@app.command()
def calibrate(
    model_dir: str = typer.Argument(..., help="checkpoint (directory or hub id) whose tokenizer encodes the windows"),
    out: Path = typer.Option(..., "--out", help="directory for calibration.safetensors + manifest.json"),
    source: Optional[str] = typer.Option(None, help="'corpus', a .txt/.jsonl file, or hf:NAME"),
    n_windows: Optional[int] = typer.Option(None, help="calibration windows"),
    seqlen: Optional[int] = typer.Option(None, help="tokens per window"),
    seed: Optional[int] = typer.Option(None, help="sampling seed"),
    params_file: Optional[Path] = typer.Option(None, "--params", help="params.yaml for defaults"),
    force: bool = typer.Option(False, help="replace OUT if it exists"),
) -> None:
    """Sample seeded calibration windows from a text source and save them with a manifest."""
    from pruneflow import calibration as C
    from pruneflow.checkpoint import load_tokenizer
    from pruneflow.params import load_params

    options = {"calibrate.source": source, "calibrate.n_windows": n_windows, "calibrate.seqlen": seqlen,
               "calibrate.seed": seed}
    try:
        c = load_params(params_file, updates={k: v for k, v in options.items() if v is not None}).calibrate
        _check_out_dir(out, force)
        _quiet_libraries()
        from pruneflow.sources import resolve

        source = resolve(model_dir)
        if not (source.path / "tokenizer_config.json").exists():
            raise PruneflowError(f"{model_dir} has no tokenizer (tokenizer_config.json)")
        windows, manifest = C.prepare(load_tokenizer(source), c.source, c.n_windows, c.seqlen, c.seed)
        C.save(windows, manifest, out, overwrite=force)
    except PruneflowError as err:
        _fail(err)
    typer.echo(json.dumps(manifest.__dict__, indent=1))


@app.command()
def evaluate(
    models: list[str] = typer.Argument(..., help="checkpoints to compare: directories or hub ids (the first is the "
                                                 "reference for encoder fidelity)"),
    max_windows: Optional[int] = typer.Option(None, help="cap on perplexity windows"),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="measure prefill latency and decode speed"),
    text: Optional[str] = typer.Option(None, help="held-out text (default corpus): corpus (the packaged test split) | FILE (.txt/.jsonl) | "
                                            "hf:NAME[:CONFIG][:SPLIT], e.g. hf:wikitext:wikitext-2-raw-v1:test"),
    seqlen: Optional[int] = typer.Option(None, help="perplexity context length (default 256; windows do not "
                                                    "overlap); the field uses 2048 or 4096 on WikiText-2"),
    threads: Optional[int] = typer.Option(None, help="torch threads for the speed measurement"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    max_memory: Optional[str] = typer.Option(
        None, help="most model weights in memory at once; a larger model is streamed for perplexity (--no-speed)"),
) -> None:
    """Measure parameters, size, test perplexity and speed of several checkpoints, one loaded at a time."""
    from pruneflow.params import EvaluateParams, RuntimeParams, validate

    try:
        given = {"source": text, "ppl_seqlen": seqlen}
        ev = validate(EvaluateParams, {"max_windows": max_windows, "speed": speed,
                                       **{k: v for k, v in given.items() if v is not None}}, prefix="evaluate")
        rt = validate(RuntimeParams, {"device": device, "dtype": dtype, "max_memory": max_memory}, prefix="runtime")
        _quiet_libraries()
        from pruneflow.evaluate import evaluate_dirs
        from pruneflow.runtime import Runtime
        from pruneflow.sources import resolve

        runtime = Runtime.from_params(rt)
        sources = {name: resolve(name) for name in models}  # every model found before the first is measured
        rows = evaluate_dirs(sources, ev, runtime, threads)
    except PruneflowError as err:
        _fail(err)
    _step(_text_title(ev))
    _table("evaluation", rows)


@app.command()
def demo(
    params_file: Optional[Path] = typer.Option(
        None, "--params", help="parameters (default: ./params.yaml if there is one, else the built-in defaults, "
                               "which the checkout's params.yaml repeats)"),
    overrides: list[str] = typer.Option([], "--set", help="override a parameter: section.key=value"),
    out: Path = typer.Option(Path("artifacts/demo"), help="directory for the demo's outputs (replaced)"),
) -> None:
    """The main job on the embedded default: prune the reference model, evaluate dense vs pruned."""
    from pruneflow.params import load_params

    if params_file is None:
        params_file = Path("params.yaml") if Path("params.yaml").is_file() else None
        if params_file is None:
            _step("no ./params.yaml: the built-in defaults (the packaged reference model and corpus)")
    try:
        params = load_params(params_file, overrides)
        _check_out_dir(out / "pruned", force=True)
        _quiet_libraries()
        _table("prune", _prune(params, out / "pruned", force=True))
        from pruneflow.evaluate import evaluate_dirs

        from pruneflow.runtime import Runtime

        runtime = Runtime.from_params(params.runtime)
        pruned = f"{params.score.method} −{params.prune.ratio:.0%}"
        rows = evaluate_dirs({"dense": params.model, pruned: out / "pruned"}, params.evaluate, runtime)
    except PruneflowError as err:
        _fail(err)
    (out / "metrics.json").write_text(json.dumps(rows, indent=1) + "\n")
    _step(_text_title(params.evaluate))
    _table("dense vs pruned", rows)


@app.command()
def stage(
    name: str = typer.Argument(..., help="source | calibrate | score | prune | recover | evaluate | export"),
    params_file: Path = typer.Option(Path("params.yaml"), "--params", help="parameters"),
    overrides: list[str] = typer.Option([], "--set", help="override a parameter: section.key=value"),
    artifacts: Path = typer.Option(Path("artifacts"), help="the artifacts directory stages read and write"),
) -> None:
    """Run one pipeline stage (as dvc.yaml declares them) on its fixed inputs and outputs under ARTIFACTS."""
    from pruneflow import stages
    from pruneflow.params import load_params

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
        from pruneflow.params import load_params
        from pruneflow.tasks.stage import StageFailed, warm_up
        from pruneflow.tasks.workspace import repo_root

        try:
            params = load_params(params_file, overrides)
            repo = repo_root(params_file.resolve().parent)
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
        check_prefect_api()
        _quiet_libraries()
        deployments.serve(repo_root(repo.resolve()), names or None, limit, schedules=not no_schedules)
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
        check_prefect_api()
        _quiet_libraries()
        ids = deployments.deploy(repo_root(repo.resolve()), pool, names or None, on_created=lambda name: _step(
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
    from pruneflow.flows.sweep import sweep as sweep_flow
    from pruneflow.params import load_params
    from pruneflow.tasks.workspace import repo_root

    try:
        params = load_params(params_file, overrides)
        _prefect_checks()
        ratio_values = [float(r) for r in ratios.split(",") if r.strip()]
        result = sweep_flow(methods=[m.strip() for m in methods.split(",") if m.strip()], ratios=ratio_values,
                            params=params, repo=str(repo_root(params_file.resolve().parent)),
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
    from pruneflow.report import run_table, task_table, write_report

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

    stopped = stack.down(run_dir)
    _step(f"stopped {', '.join(stopped)}" if stopped else f"no local stack in {run_dir}")


@app.command()
def methods() -> None:
    """List the importance methods: what each scores, needs, what allocation auto means for it, and whether it
    streams a model larger than --max-memory."""
    from pruneflow.methods import METHODS

    for m in METHODS.values():
        needs = ", ".join(sorted(m.needs)) or "weights only"
        auto = f" (auto: {', '.join(m.auto_units)})" if m.auto_units else ""
        typer.echo(f"{m.name:16s} {m.summary}\n{'':16s} units: {', '.join(m.units)}{auto}; needs: {needs}; "
                   f"allocation auto: {m.allocation}" + ("; iterative" if m.iterative else "")
                   + ("; streams (--max-memory)" if m.streams else "")
                   + ("; also the channels inside MoE experts" if m.expert_channels else ""))


@export_app.command("gguf")
def export_gguf(
    checkpoint: str = typer.Argument(..., help="checkpoint: a directory (pruneflow's or transformers') or a hub "
                                               "id ORG/NAME[@REVISION]"),
    out: Path = typer.Argument(..., help="the .gguf file to write (must not exist)"),
    dtype: str = typer.Option("auto", help="auto (the checkpoint's: bf16/f16 stay, else f32) | f32 | f16 | bf16; "
                                           "norms and biases are always f32"),
    force: bool = typer.Option(False, help="replace OUT if it exists"),
) -> None:
    """Write CHECKPOINT as one GGUF file for llama.cpp: uniform widths as the model's own architecture
    (llama, qwen2, qwen3), per-layer widths as llama.cpp's `deci`."""
    from pruneflow.export import export_gguf as run_export

    _quiet_libraries()
    try:
        summary = run_export(checkpoint, out, dtype, overwrite=force)
    except PruneflowError as err:
        _fail(err)
    typer.echo(f"wrote {summary['path']}: {summary['architecture']}, {summary['blocks']} blocks, "
               f"{summary['dtype']}, {summary['tensors']} tensors, {summary['bytes'] / 2**20:.1f} MiB; tokenizer "
               f"{summary['tokenizer']['model']} ({summary['tokenizer']['tokens']} tokens)")


@export_app.command("onnx")
def export_onnx(
    checkpoint: str = typer.Argument(..., help="checkpoint: a directory (pruneflow's or transformers') or a hub "
                                               "id ORG/NAME[@REVISION]"),
    out_dir: Path = typer.Argument(..., help="the directory to write (must not exist)"),
    force: bool = typer.Option(False, help="replace OUT_DIR if it exists"),
) -> None:
    """Write CHECKPOINT as an ONNX model (float32, dynamic batch and length, no KV cache), checked in ONNX
    Runtime against torch before it is written."""
    from pruneflow.export import export_onnx as run_export

    _quiet_libraries()
    try:
        summary = run_export(checkpoint, out_dir, overwrite=force)
    except PruneflowError as err:
        _fail(err)
    typer.echo(f"wrote {summary['path']}: model.onnx ({summary['output']}), {summary['bytes'] / 2**20:.1f} MiB; "
               f"ONNX Runtime vs torch: {summary['onnxruntime_max_diff']:.1e}")


@reference_app.command("build")
def reference_build(
    config: str = typer.Option("default", help="geometry: default (8 layers, hidden 256, 8/4 heads) | deep "
                                               "(12 layers, hidden 192, 6/2 heads, tied embeddings) | moe "
                                               "(Qwen3-MoE, 8 experts top-2) | moe-mixtral (Mixtral, 16 experts "
                                               "top-4)"),
    out: Optional[Path] = typer.Option(None, help="where to write the model (default: models/reference for "
                                                  "default, models/reference-deep for deep, "
                                                  "models/reference-moe[-mixtral])"),
    train_tokens: Optional[int] = typer.Option(None, help="training tokens (default: the committed model's)"),
    threads: Optional[int] = typer.Option(None, help="torch threads (changes float rounding, so results)"),
) -> None:
    """Retrain the reference model from the packaged corpus (~40 min on 2 cores)."""
    from dataclasses import replace

    from pruneflow import reference

    if config not in reference.CONFIGS:
        _fail(PruneflowError(f"unknown reference config {config!r}; choose from {', '.join(reference.CONFIGS)}"))
    _quiet_libraries()
    out = out or Path(reference.OUT_DIRS[config])
    cfg = replace(reference.CONFIGS[config], **{k: v for k, v in {"train_tokens": train_tokens, "threads": threads}.items() if v})
    try:
        results = reference.build(out, cfg)
    except PruneflowError as err:
        _fail(err)
    typer.echo(json.dumps(results, indent=1))


@corpus_app.command("build")
def corpus_build(out: Path = typer.Option(Path("data/corpus"), help="output directory")) -> None:
    """Fetch the pinned corpus packages (pip/npm), verify sha256, and rewrite the splits."""
    from pruneflow import corpus

    try:
        manifest = corpus.build(out)
    except corpus.CorpusError as err:
        _fail(err)
    typer.echo(json.dumps(manifest["splits"], indent=1))


def main() -> None:
    """The console script. After the command, exit handlers run, threads are joined and streams flushed, then
    the process ends without tearing down every module object: that teardown takes ~1.5 s once Prefect,
    MLflow and DVC are loaded, and a `pruneflow run` with nothing to do is ~10 s. (Tests invoke ``app``.)"""
    import atexit
    import threading

    try:
        app()
        code = 0
    except SystemExit as exit_:
        if exit_.code is not None and not isinstance(exit_.code, int):
            raise  # a message to print: let Python's own exit do it
        code = exit_.code or 0
    # as the interpreter does at exit: threading's own exit callbacks first (they stop idle thread pools such as
    # MLflow's artifact uploader, whose workers wait for work forever), then every non-daemon thread is joined
    # (joining before those callbacks kept `pruneflow sweep` alive ~5 min after its flow had finished)
    threading._shutdown()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
