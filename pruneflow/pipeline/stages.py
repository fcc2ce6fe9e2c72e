"""The pipeline's stages as library functions over one artifacts directory.

``pruneflow stage NAME`` runs one; ``dvc.yaml`` declares them (deps, params, outs) and is the only stage graph.
Each stage reads the params tree and the previous stages' fixed outputs and writes its own output atomically
(a temp sibling renamed into place), so an interrupted stage never leaves a partial output behind. Every stage
also records its seconds and peak memory in ``artifacts/resources/<stage>.json``.

    source     model (a directory or hub id)          → artifacts/source.json   (resolved commit, file digests)
    calibrate  model tokenizer + calibrate.*          → artifacts/calibration/  (windows + manifest)
    score      model + calibration + score.*, prune.* → artifacts/scores/       (scores, or an iterative plan)
    prune      model + scores + prune.*               → artifacts/model/        (checkpoint + plan.json)
    recover    model + artifacts/model + recover.*    → artifacts/recovered/    (LoRA-merged checkpoint, or a skip)
    evaluate   model + both checkpoints + evaluate.*  → artifacts/metrics.json  (dense vs pruned vs recovered)
    export     the final checkpoint + export.*        → artifacts/export/       (GGUF / ONNX, or nothing)
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pruneflow.model import arch as A
from pruneflow.data import calibration as C
from pruneflow.model import checkpoint
from pruneflow import units
from pruneflow.atomic import atomic_dir
from pruneflow.errors import PruneflowError
from pruneflow.execution import streaming
from pruneflow.pipeline.graph import OUTPUTS, REPORT, RESOURCES, STAGES
from pruneflow.methods import METHODS
from pruneflow.pipeline.params import Params
from pruneflow.execution.runtime import Runtime, dtype_name
from pruneflow.selection.scores import Scores
from pruneflow.sizes import format_size
from pruneflow.model.sources import ModelSource, fingerprint, resolve
from pruneflow.execution.estimate import estimate
from pruneflow.prune import (apply_plan, check_model, check_reconstruct, check_streams, check_units, choose, means_for,
                             prune_iteratively, uses_objective)
from pruneflow.prune import score as run_scorer
from pruneflow.evaluation.lm_tasks import build_tasks, evaluate_tasks, task_manager
from pruneflow.model.export import check_onnx, check_plan
from pruneflow.selection.plan import PrunePlan
from pruneflow.pipeline import recover as R
from pruneflow.evaluation.evaluate import evaluate_dirs
from pruneflow.model.export import export_gguf, export_onnx
from pruneflow.model.quantize import quantize_gguf
from pruneflow.model import deci
from pruneflow.model.deci import export_vllm
from pruneflow.data import corpus
from pruneflow.evaluation.report import write_report
from pruneflow.data.calibration import describe_held_out

log = logging.getLogger(__name__)


def run(name: str, params: Params, root: Path = Path("artifacts")) -> Path:
    """Run stage ``name``; returns the path of its output (and writes ``resources/<name>.json``)."""
    if name not in STAGES:
        raise PruneflowError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    stages = {"source": source, "calibrate": calibrate, "score": score, "prune": prune, "recover": recover,
              "evaluate": evaluate, "export": export}
    root = Path(root)
    runtime = Runtime.from_params(params.runtime)
    runtime.reset_peak()
    started, read = time.perf_counter(), streaming.READ["bytes"]
    out = stages[name](params, root, runtime)
    _write_json(root / RESOURCES / f"{name}.json", {
        "stage": name, "seconds": time.perf_counter() - started, **runtime.peak_bytes(),
        "bytes_read": streaming.READ["bytes"] - read,  # from checkpoint files (streamed reads and whole loads)
        "device": str(runtime.device), "dtype": dtype_name(runtime.dtype) if runtime.dtype else "auto"})
    return out


def check_memory(params: Params, base: Path | None = None) -> None:
    """Before any stage runs: with ``runtime.max_memory`` below the model's weights, every stage must stream
    (score with a streaming method, no recovery, evaluate perplexity only)."""
    if not params.runtime.max_memory:
        return
    runtime = Runtime.from_params(params.runtime)
    _, weight_bytes = checkpoint.compute_size(resolve(params.model, base), runtime)
    if not runtime.streams(weight_bytes):
        return
    check_streams(params.score.method)
    e = params.evaluate
    whole = [what for what, on in (("recover (LoRA): recover.enabled: false", params.recover.enabled),
                                   ("evaluate's speed: evaluate.speed: false", e.speed),
                                   ("evaluate's lm-eval tasks: evaluate.tasks: []", bool(e.tasks)),
                                   ("the ONNX export (float32, traced whole): drop onnx from export.formats",
                                    "onnx" in params.export.formats)) if on]
    if whole:
        raise PruneflowError(f"the model's weights ({format_size(weight_bytes)}) exceed runtime.max_memory "
                             f"({params.runtime.max_memory}); these need the whole model in memory: "
                             f"{'; '.join(whole)} (or raise runtime.max_memory)")


def check_fits(params: Params, base: Path | None = None) -> None:
    """Before any stage runs (the flow's preflight, and ``pruneflow run`` before it starts the flow): what the
    source stage refuses, a calibration file that is not there, :func:`check_memory`, then the prune's plan of
    work from the config alone (``pruneflow prune --dry-run``'s estimate; a hub id fetches configs only) must fit
    the device, or ``runtime.max_memory`` when the model streams — said now, not after the source and calibration
    stages. ``base``: what a relative ``params.model`` and calibration file are relative to (the repository the
    stages run in)."""
    check_memory(params, base)
    source = resolve(params.model, base, weights=False)
    config = checkpoint.read_config(source)
    check_model(params.score.method, A.arch_for(config.get("model_type", "")), params.prune,
                params.score.objective)  # the source stage's unit settings among them
    check_windows(params, config)
    check_export(params, config)
    C.check_source(params.calibrate.source, "calibrate.source", base)
    runtime = Runtime.from_params(params.runtime)
    plan = estimate(source.path, params, runtime)
    if not plan.fits:
        raise PruneflowError(f"this prune does not fit: {plan.why}; `pruneflow prune --dry-run --params "
                             f"params.yaml` shows each phase (raise runtime.max_memory, or lower calibrate.n_windows "
                             f"or seqlen)")
    log.info("plan of work: %s peak, %s read from the checkpoint files, %s", format_size(plan.peak_bytes),
             format_size(sum(p.total("read_bytes") for p in plan.phases)), plan.why)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def model_source(params: Params, root: Path) -> ModelSource:
    """``params.model`` resolved; a hub model at the commit the source stage recorded, so every stage of a run
    reads the same files even if the branch moves meanwhile."""
    record = root / OUTPUTS["source"]
    if record.exists():
        data = json.loads(record.read_text())
        if data.get("model") == params.model and data.get("commit"):
            pinned = resolve(f"{data['repo_id']}@{data['commit']}")
            return ModelSource(name=params.model, path=pinned.path, repo_id=pinned.repo_id,
                               revision=data.get("revision"), commit=pinned.commit)
    return resolve(params.model)


def source(params: Params, root: Path, runtime: Runtime) -> Path:
    """Resolve ``model`` and record what identifies its content (DVC tracks this file, not the model's path:
    a hub id has none in the workspace). Unchanged content gives the same file, so later stages stay cached."""
    model = resolve(params.model)
    config = checkpoint.read_config(model)  # a directory without config.json fails here, not three stages later
    checkpoint.weight_dtypes(model.path)
    check_unit_settings(params, config)
    check_windows(params, config)
    check_export(params, config)
    _write_json(root / OUTPUTS["source"], fingerprint(model, state_dir(root) / "digests.json"))
    return root / OUTPUTS["source"]


def check_unit_settings(params: Params, config: dict) -> None:
    """Units the architecture cannot be pruned by (experts of a dense model, heads of an MoE model) fail in the
    source stage."""
    spec = A.arch_for(config.get("model_type", ""))
    method = params.score.method
    units.check_settings(spec, params.prune.for_method(method), method)


def check_windows(params: Params, config: dict) -> None:
    """Calibration and perplexity windows the model's positions hold, in the source stage (the evaluate stage
    comes after the pruning and the recovery)."""
    positions = config.get("max_position_embeddings")
    C.check_seqlen(params.calibrate.seqlen, positions, "calibrate.seqlen")
    if params.recover.enabled:
        C.check_seqlen(params.recover.seqlen, positions, "recover.seqlen")
    if A.arch_for(config.get("model_type", "")).causal_lm:  # an encoder has no perplexity windows
        C.check_seqlen(params.evaluate.ppl_seqlen, positions, "evaluate.ppl_seqlen")


def check_export(params: Params, config: dict) -> None:
    """An export the model or the planned widths cannot take fails in the source stage, before any work."""
    if "onnx" in params.export.formats:
        try:
            check_onnx(config)
        except PruneflowError as err:
            raise PruneflowError(f"export.formats has onnx, but {err}") from None
    cfg = params.prune.for_method(params.score.method)
    if "vllm" in params.export.formats:
        try:
            deci.check_plan(config, cfg.units, cfg.allocation, cfg.reconstruct)
        except PruneflowError as err:
            raise PruneflowError(f"export.formats has vllm, but {err}") from None
    if "gguf" not in params.export.formats:
        return

    try:
        per_layer = cfg.allocation != "uniform" and not set(cfg.units) <= {"layers", "merged_layers"}
        check_plan(config, per_layer=per_layer,
                   output_bias=cfg.reconstruct == "bias")
    except PruneflowError as err:
        raise PruneflowError(f"export.formats has gguf, but {err}") from None


def state_dir(root: Path) -> Path:
    """Where an iterative method keeps its completed iterations for resume: ``PRUNEFLOW_STATE_DIR`` (the flow
    points isolated runs at the main checkout's, which outlives their worktrees), else ``root/.state``.
    Entries are keyed by a hash of weights, windows and params, so runs can share one directory."""
    return Path(os.environ.get("PRUNEFLOW_STATE_DIR") or Path(root) / ".state")


def _needs(path: Path, stage: str) -> Path:
    if not path.exists():
        raise PruneflowError(f"{path} is missing: run the {stage} stage first (`pruneflow stage {stage}`)")
    return path


def calibrate(params: Params, root: Path, runtime: Runtime) -> Path:
    c, model = params.calibrate, model_source(params, root)
    tokenizer = checkpoint.load_tokenizer(model)
    max_positions = checkpoint.read_config(model).get("max_position_embeddings")
    windows, manifest = C.prepare(tokenizer, c.source, c.n_windows, c.seqlen, c.seed, max_positions)
    C.save(windows, manifest, root / OUTPUTS["calibrate"], overwrite=True)
    return root / OUTPUTS["calibrate"]


def save_scores(scores: Scores, out_dir: Path) -> None:
    """Scores as safetensors (one tensor per layer and kind) + scores.json (flags)."""
    tensors = {f"heads.{i}": t for i, t in enumerate(scores.heads)}
    tensors |= {f"channels.{i}": t for i, t in enumerate(scores.channels)}
    for kind in ("attn_mean", "mlp_mean", "kv_heads", "experts"):
        tensors |= {f"{kind}.{i}": t for i, t in enumerate(getattr(scores, kind) or [])}
    for kind in ("layers", "hidden"):
        if getattr(scores, kind) is not None:
            tensors[kind] = getattr(scores, kind)
    tensors |= {f"extra.{k}": v for k, v in scores.extra.items() if isinstance(v, torch.Tensor)}  # a unit's own
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out_dir / "scores.safetensors"))


def load_scores(out_dir: Path) -> Scores:
    tensors = load_file(str(out_dir / "scores.safetensors"))
    meta = json.loads((out_dir / "scores.json").read_text())

    def series(kind: str) -> list[torch.Tensor]:
        return [tensors[f"{kind}.{i}"] for i in range(sum(k.startswith(f"{kind}.") for k in tensors))]

    return Scores(heads=series("heads"), channels=series("channels"), comparable=meta["comparable"],
                  layers=tensors.get("layers"), hidden=tensors.get("hidden"), attn_mean=series("attn_mean") or None,
                  mlp_mean=series("mlp_mean") or None, kv_heads=series("kv_heads") or None,
                  experts=series("experts") or None,
                  extra={k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")})


def method_options(params: Params):
    """The options model of the scored method (``score.<method>``), or None."""
    entry = METHODS[params.score.method]
    return getattr(params.score, entry.name) if entry.options else None


def score(params: Params, root: Path, runtime: Runtime) -> Path:
    method, seed = params.score.method, params.calibrate.seed
    spec = A.arch_for(checkpoint.read_config(model_source(params, root)).get("model_type", ""))
    check_model(method, spec, params.prune, params.score.objective)  # before the model is loaded
    windows, manifest = C.load(_needs(root / OUTPUTS["calibrate"], "calibrate"))
    model, _, spec = checkpoint.load(model_source(params, root), runtime, with_tokenizer=False,
                                     stream=METHODS[method].streams, calibration=tuple(windows.shape),
                                     purpose=f"method {method}")
    cfg = params.prune.for_method(method)
    check_units(model, spec, cfg, method)
    started = time.perf_counter()
    meta = {"method": method, "calibration_digest": manifest.source_digest}
    with atomic_dir(root / OUTPUTS["score"], overwrite=True) as tmp:
        if METHODS[method].iterative:  # the plan is the score: it comes out of the score → select → apply loop
            result = prune_iteratively(model, spec, method, params.prune, windows, seed, method_options(params),
                                       state_dir=state_dir(root), runtime=runtime, refit=False,
                                       objective=params.score.objective)
            (tmp / "plan.json").write_text(result.plan.to_json() + "\n")
            (tmp / "iterations.json").write_text(json.dumps(result.iterations, indent=1) + "\n")
            meta["comparable"] = True
        else:
            options = method_options(params)
            scores = run_scorer(model, spec, method, windows, seed, params.prune.ratio, runtime,
                                **({"config": options} if options is not None else {}),
                                **({"objective": params.score.objective} if uses_objective(method) else {}))
            save_scores(scores, tmp)
            meta["comparable"] = scores.comparable
        meta["seconds"] = time.perf_counter() - started
        (tmp / "scores.json").write_text(json.dumps(meta, indent=1) + "\n")
    return root / OUTPUTS["score"]


def prune(params: Params, root: Path, runtime: Runtime) -> Path:
    scores_dir = _needs(root / OUTPUTS["score"], "score")
    meta = json.loads((scores_dir / "scores.json").read_text())
    if meta["method"] != params.score.method:
        raise PruneflowError(f"{scores_dir} holds {meta['method']} scores but score.method is "
                             f"{params.score.method}; run the score stage again")
    dense = model_source(params, root)
    cfg = params.prune.for_method(meta["method"])
    windows = None
    if cfg.reconstruct != "none" or cfg.allocation == "search":  # means, the re-fit's activations, the search's
        windows, _ = C.load(_needs(root / OUTPUTS["calibrate"], "calibrate"))
    model, tokenizer, spec = checkpoint.load(dense, runtime, stream=True)  # streamed: sliced as it is written
    check_reconstruct(model, spec, cfg, windows, runtime)
    check_units(model, spec, cfg, meta["method"])
    scores, extra = None, {}
    if (scores_dir / "plan.json").exists():
        plan = PrunePlan.load(scores_dir / "plan.json")
        scores = means_for(model, spec, cfg, None, windows, runtime)
    else:
        scores = means_for(model, spec, cfg, load_scores(scores_dir), windows, runtime)
        plan, searched = choose(model, spec, meta["method"], cfg, scores, windows, runtime, params.calibrate.seed,
                                params.score.objective)
        if searched is not None:
            extra["search.json"] = json.dumps(searched, indent=1)
    fit = apply_plan(model, spec, plan, scores, windows, runtime)
    if fit:
        extra["reconstruction.json"] = json.dumps(fit, indent=1)
    out = root / OUTPUTS["prune"]
    checkpoint.save(model, tokenizer, out, spec, overwrite=True, dtype=checkpoint.stored_dtype(dense),
                    extra_files={"plan.json": plan.to_json(), "params.json": params.model_dump_json(indent=1),
                                 **extra}, runtime=runtime)
    return out


def recover(params: Params, root: Path, runtime: Runtime) -> Path:
    """LoRA recovery of the pruned model on the calibration source; with ``recover.enabled: false`` the output
    is only ``recovery.json`` saying so (DVC still gets its out, evaluate then scores the pruned model).

    One model is loaded at a time where that saves memory: the dense teacher first; if its hidden states for
    every step take less room than its weights they are computed and the teacher is freed before the student
    is loaded, otherwise the two are held together."""
    pruned = _needs(root / OUTPUTS["prune"], "prune")
    out, cfg = root / OUTPUTS["recover"], params.recover
    if not cfg.enabled:
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "recovery.json").write_text(json.dumps({"enabled": False}, indent=1) + "\n")
        return out
    tokenizer = checkpoint.load_tokenizer(pruned)
    max_positions = checkpoint.read_config(pruned).get("max_position_embeddings")
    windows, manifest = C.prepare(tokenizer, params.calibrate.source, cfg.steps * cfg.batch_size, cfg.seqlen,
                                  cfg.seed, max_positions)
    teacher, precomputed = None, False
    if cfg.distill_weight > 0:
        teacher = checkpoint.load(model_source(params, root), runtime, with_tokenizer=False,
                                  purpose="LoRA recovery's teacher")[0]
        weights = sum(p.numel() * p.element_size() for p in teacher.parameters())
        if R.precompute_pays(teacher.config, weights, cfg, teacher.dtype):
            narrower = checkpoint.read_config(pruned).get("hidden_size") != teacher.config.hidden_size
            teacher, precomputed = R.teacher_states(teacher, windows, cfg, runtime, keep_head=narrower), True
            runtime.free()
    model, _, spec = checkpoint.load(pruned, runtime, with_tokenizer=False, purpose="LoRA recovery")
    result = R.recover(model, windows, spec, cfg, teacher, runtime)
    first, last = result.history[:10], result.history[-10:]
    summary = {"enabled": True, "seconds": result.seconds, "source_digest": manifest.source_digest,
               "train_tokens": int(windows.numel()), "loss_first10": sum(h["loss"] for h in first) / len(first),
               "loss_last10": sum(h["loss"] for h in last) / len(last), "teacher_precomputed": precomputed,
               "gradient_checkpointing": result.gradient_checkpointing, "history": result.history}
    checkpoint.save(result.model, tokenizer, out, spec, overwrite=True, dtype=checkpoint.stored_dtype(pruned),
                    extra_files={
        "plan.json": (pruned / "plan.json").read_text(), "recovery.json": json.dumps(summary, indent=1) + "\n",
        "loss.csv": "step,loss,ce,kd,lr\n" + "".join(
            f"{h['step']},{h['loss']:.6f},{h['ce']:.6f},{h['kd']:.6f},{h['lr']:.3g}\n" for h in result.history)})
    return out


def gates(metrics: dict, params: Params) -> dict[str, dict]:
    """Quality gates: each {value, limit, passed}; a model is promoted only when all pass."""
    e = params.evaluate
    out = {"achieved_ratio": {"value": metrics["achieved_ratio"], "limit": f"{params.prune.ratio} ± {e.ratio_tolerance}",
                              "passed": abs(metrics["achieved_ratio"] - params.prune.ratio) <= e.ratio_tolerance}}
    if "ppl_ratio" in metrics:
        out["ppl_ratio"] = {"value": metrics["ppl_ratio"], "limit": e.max_ppl_ratio,
                            "passed": metrics["ppl_ratio"] <= e.max_ppl_ratio}
    final, dense = metrics.get(metrics.get("final", "pruned"), {}), metrics.get("dense", {})
    for task, score in final.get("tasks", {}).items():
        base = dense.get("tasks", {}).get(task)
        if score is not None and base:
            out[f"task.{task}"] = {"value": score / base, "limit": e.min_task_ratio,
                                   "passed": score / base >= e.min_task_ratio}
    return out


def evaluate(params: Params, root: Path, runtime: Runtime) -> Path:
    pruned = _needs(root / OUTPUTS["prune"], "prune")
    which, final = final_model(root)
    dense = model_source(params, root)
    models = {"dense": dense, "pruned": pruned} | ({"recovered": final} if which == "recovered" else {})
    plan = json.loads((pruned / "plan.json").read_text())
    with atomic_dir(root / REPORT, overwrite=True) as report_dir:
        manager = _task_setup(params, dense, report_dir)  # unknown task names fail here, before any evaluation
        lm_eval: dict = {}

        def run_tasks(name: str, model, tokenizer, row: dict) -> None:  # while the model is loaded

            e = params.evaluate
            result = evaluate_tasks(model, tokenizer, e.tasks, manager, e.task_batch_size, e.task_limit)
            row["tasks"] = result["scores"]
            lm_eval[name] = result["results"]
            lm_eval["versions"], lm_eval["configs"] = result["versions"], result["configs"]

        rows = evaluate_dirs(models, params.evaluate, runtime, each=run_tasks if manager else None)
        metrics = _metrics(params, rows, plan)
        (report_dir / "lm_eval.json").write_text(json.dumps(lm_eval, indent=1, default=str) + "\n")
        _write_report(dense, params, metrics, plan, report_dir)
        out = root / OUTPUTS["evaluate"]
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(metrics, indent=1) + "\n")
        os.replace(tmp, out)
    return out


def final_model(root: Path) -> tuple[str, Path]:
    """The model the gates judge, the registry gets and the export writes: the recovered checkpoint when
    recovery ran, else the pruned one."""
    recovered = _needs(root / OUTPUTS["recover"], "recover")
    if (recovered / "config.json").exists():
        return "recovered", recovered
    return "pruned", _needs(root / OUTPUTS["prune"], "prune")


def export(params: Params, root: Path, runtime: Runtime) -> Path:
    """The final model in the formats of ``export.formats`` under ``artifacts/export/`` (``model.gguf``,
    ``model-TYPE.gguf`` per ``export.quantize`` type, ``onnx/``, ``vllm/``) with ``export.json`` (what was exported from which
    model, the quantized files' tensor types and fallbacks); with none, ``export.json`` only."""
    which, model = final_model(root)
    formats = params.export.formats
    summary: dict = {"formats": formats, "model": which if formats else None}
    with atomic_dir(root / OUTPUTS["export"], overwrite=True) as tmp:
        if "gguf" in formats:
            log.info("exporting the %s model to GGUF", which)
            info = export_gguf(model, tmp / "model.gguf", params.export.dtype)
            summary["gguf"] = {**info, "path": "model.gguf"}
            for kind in params.export.quantize:  # from model.gguf, by llama.cpp's quantizer
                log.info("quantizing the GGUF to %s", kind)
                info = quantize_gguf(tmp / "model.gguf", tmp / f"model-{kind}.gguf", kind)
                summary.setdefault("quantized", {})[kind] = {**info, "path": f"model-{kind}.gguf"}
        if "vllm" in formats:
            log.info("exporting the %s model for vLLM (nemotron-nas)", which)
            info = export_vllm(model, tmp / "vllm")
            summary["vllm"] = {**info, "path": "vllm"}
        if "onnx" in formats:
            log.info("exporting the %s model to ONNX", which)
            info = export_onnx(model, tmp / "onnx")
            summary["onnx"] = {**info, "path": "onnx"}
        (tmp / "export.json").write_text(json.dumps(summary, indent=1) + "\n")
    return root / OUTPUTS["export"]


def _task_setup(params: Params, dense: ModelSource, report_dir: Path):
    """The local lm-eval tasks, written under the report, and a TaskManager that knows every asked name."""
    e = params.evaluate
    if not e.tasks:
        return None
    tokenizer = checkpoint.load_tokenizer(dense)
    max_tokens = checkpoint.read_config(dense).get("max_position_embeddings")
    task_dir = build_tasks(report_dir / "lm_tasks", corpus.load_split("test"), e.task_examples, seed=0,
                           tokenizer=tokenizer, max_tokens=max_tokens)
    return task_manager(task_dir, e.tasks)


def _write_report(dense: ModelSource, params: Params, metrics: dict, plan: dict, report_dir: Path) -> None:
    config = checkpoint.read_config(dense)
    widths = {"layers": config["num_hidden_layers"], "heads": config["num_attention_heads"],
              "kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
              "channels": config[A.expert_width_key(config)],  # MoE: an expert's
              "experts": config.get("num_experts") or config.get("num_local_experts")}
    write_report(report_dir, {f"{metrics['method']} −{params.prune.ratio:g}": metrics}, plan, widths)


def _metrics(params: Params, rows: dict[str, dict], plan: dict) -> dict:
    metrics = dict(rows)
    final = "recovered" if "recovered" in rows else "pruned"  # the model the gates judge and the registry gets
    metrics |= {"final": final, "achieved_ratio": plan["params"]["achieved_ratio"], "method": plan["method"],
                "ppl_text": {**describe_held_out(params.evaluate.source), "seqlen": params.evaluate.ppl_seqlen}}
    if "test_ppl" in metrics["dense"]:
        for name in rows.keys() - {"dense"}:
            metrics[f"ppl_ratio_{name}"] = metrics[name]["test_ppl"] / metrics["dense"]["test_ppl"]
        metrics["ppl_ratio"] = metrics[f"ppl_ratio_{final}"]
    metrics["gates"] = gates(metrics, params)
    metrics["gates_passed"] = all(g["passed"] for g in metrics["gates"].values())
    return metrics
