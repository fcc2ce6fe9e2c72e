"""Commands on models: prune (and its dry run), calibrate, evaluate, demo."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from pruneflow.atomic import check_output_dir
from pruneflow.errors import PruneflowError
from pruneflow.cli.common import (_quiet_libraries, _fail, _step, _table, _text_title, DEVICE_HELP, DTYPE_HELP, app)


@app.command()
def prune(
    model_dir: str = typer.Argument(..., help="checkpoint to prune: a directory (safetensors + config) or a hub "
                                              "id ORG/NAME[@REVISION]"),
    out: Optional[Path] = typer.Option(None, "--out", help="where to write the pruned checkpoint (must not exist)"),
    method: Optional[str] = typer.Option(None, help="importance method; see `pruneflow methods`"),
    ratio: Optional[float] = typer.Option(None, help="fraction of non-embedding parameters to remove"),
    calibration: Optional[str] = typer.Option(None, help="'corpus', a .txt/.jsonl file, or hf:NAME"),
    units: Optional[str] = typer.Option(
        None, help="auto (the method's) or comma-separated: heads,channels | layers | subblocks | merged_layers | "
                   "hidden | experts (on an MoE model, channels are those inside its experts); see `pruneflow "
                   "methods` for what each method scores"),
    allocation: Optional[str] = typer.Option(None, help="uniform | global | search (per-layer counts searched on calibration loss) | auto"),
    objective: Optional[str] = typer.Option(
        None, help="what bonsai, sleb, blockpruner and --allocation search measure candidates by: loss | kl (to the "
                   "unmasked model's next-token distribution) | hidden (1 − cos of the final hidden states; "
                   "encoders) | auto (the paper's: loss, hidden on an encoder)"),
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
    from pruneflow.pipeline.params import load_params

    options = {"calibrate.source": calibration, "calibrate.seed": seed, "calibrate.n_windows": n_calibration,
               "calibrate.seqlen": seqlen, "score.method": method, "score.objective": objective,
               "prune.ratio": ratio,
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
        check_output_dir(out, force)
        _quiet_libraries()
        summary = _prune(params, out, force, state_dir or out.parent / f".{out.name}.state", max_shard_size)
    except PruneflowError as err:
        _fail(err)
    _table(f"pruned {model_dir} → {out}", summary)


def _dry_run(params) -> bool:
    """Print the plan of work of ``params`` (pruneflow.execution.estimate); whether it fits."""
    from rich.console import Console
    from rich.table import Table

    from pruneflow.model import arch as A
    from pruneflow.model import checkpoint
    from pruneflow.execution.estimate import estimate
    from pruneflow.pipeline.params import check_method
    from pruneflow.prune import check_model
    from pruneflow.execution.runtime import Runtime
    from pruneflow.sizes import format_size
    from pruneflow.model.sources import resolve

    runtime = Runtime.from_params(params.runtime)
    method = params.score.method
    try:
        check_method(method, params.prune)
    except ValueError as err:
        raise PruneflowError(str(err)) from None
    source = resolve(params.model, weights=False)
    check_model(method, A.arch_for(checkpoint.read_config(source).get("model_type", "")), params.prune,
                params.score.objective)
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
    reference = max((p.host_bytes for p in plan.phases), default=0)
    if reference:
        console.print(f"score.objective {params.score.objective}: the unmasked model's final hidden states of the "
                      f"measured windows, {format_size(reference)}, stay on the host while candidates run"
                      + (" (counted in the peak)" if runtime.device.type == "cpu" else ""))
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
    from pruneflow.model import arch as A
    from pruneflow.data import calibration as C
    from pruneflow.model import checkpoint
    from pruneflow.methods import METHODS
    from pruneflow.prune import check_model, check_streams
    from pruneflow.prune import prune as run_prune
    from pruneflow.execution.runtime import Runtime
    from pruneflow.sizes import format_size, parse_size
    from pruneflow.model.sources import resolve
    from pruneflow.pipeline.stages import method_options

    started = time.perf_counter()
    runtime = Runtime.from_params(params.runtime)
    parse_size(max_shard_size)
    source = resolve(params.model)  # hub errors (not cached, gated, unknown revision) before any work
    method, c = params.score.method, params.calibrate
    config = checkpoint.read_config(source)
    check_model(method, A.arch_for(config.get("model_type", "")), params.prune, params.score.objective)
    C.check_source(c.source)  # what the calibration can be refused for without the model, before it loads
    C.check_seqlen(c.seqlen, config.get("max_position_embeddings"))
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
                       options=method_options(params), state_dir=state_dir, runtime=runtime,
                       objective=params.score.objective)
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
    from pruneflow.evaluation.evaluate import size_on_disk

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
    from pruneflow.data import calibration as C
    from pruneflow.model.checkpoint import load_tokenizer, read_config
    from pruneflow.pipeline.params import load_params

    options = {"calibrate.source": source, "calibrate.n_windows": n_windows, "calibrate.seqlen": seqlen,
               "calibrate.seed": seed}
    try:
        c = load_params(params_file, updates={k: v for k, v in options.items() if v is not None}).calibrate
        check_output_dir(out, force)
        _quiet_libraries()
        from pruneflow.model.sources import resolve

        source = resolve(model_dir)
        if not (source.path / "tokenizer_config.json").exists():
            raise PruneflowError(f"{model_dir} has no tokenizer (tokenizer_config.json)")
        C.check_source(c.source)  # before the tokenizer loads
        positions = read_config(source).get("max_position_embeddings")
        windows, manifest = C.prepare(load_tokenizer(source), c.source, c.n_windows, c.seqlen, c.seed, positions)
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
    from pruneflow.pipeline.params import EvaluateParams, RuntimeParams, validate

    try:
        given = {"source": text, "ppl_seqlen": seqlen}
        ev = validate(EvaluateParams, {"max_windows": max_windows, "speed": speed,
                                       **{k: v for k, v in given.items() if v is not None}}, prefix="evaluate")
        rt = validate(RuntimeParams, {"device": device, "dtype": dtype, "max_memory": max_memory}, prefix="runtime")
        _quiet_libraries()
        from pruneflow.evaluation.evaluate import evaluate_dirs
        from pruneflow.execution.runtime import Runtime
        from pruneflow.model.sources import resolve

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
    from pruneflow.pipeline.params import load_params

    if params_file is None:
        params_file = Path("params.yaml") if Path("params.yaml").is_file() else None
        if params_file is None:
            _step("no ./params.yaml: the built-in defaults (the packaged reference model and corpus)")
    try:
        params = load_params(params_file, overrides)
        check_output_dir(out / "pruned", overwrite=True)
        _quiet_libraries()
        _table("prune", _prune(params, out / "pruned", force=True))
        from pruneflow.evaluation.evaluate import evaluate_dirs

        from pruneflow.execution.runtime import Runtime

        runtime = Runtime.from_params(params.runtime)
        pruned = f"{params.score.method} −{params.prune.ratio:.0%}"
        rows = evaluate_dirs({"dense": params.model, pruned: out / "pruned"}, params.evaluate, runtime)
    except PruneflowError as err:
        _fail(err)
    (out / "metrics.json").write_text(json.dumps(rows, indent=1) + "\n")
    _step(_text_title(params.evaluate))
    _table("dense vs pruned", rows)


