"""The one parameter tree: ``params.yaml`` loads into :class:`Params` (extra keys forbidden)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pruneflow.errors import PruneflowError
from pruneflow.execution import DEVICE_WORDS, DEVICES, WORKERS, WORKERS_WORDS
from pruneflow.methods import METHODS
from pruneflow.methods.options import (BONSAI_PRESETS, BonsaiParams, ExpertDropParams, LacoParams,  # noqa: F401
                                       Options, SearchParams)
from pruneflow.sizes import parse_size
from pruneflow.units import ALIASES, ALLOCATIONS, RECONSTRUCTIONS, UNIT_TYPES
from pruneflow.data.corpus import parse_hf
from pruneflow.evaluation.lm_tasks import LOCAL_TASKS

MethodName = Literal[tuple(METHODS)]  # a choice in the Prefect form
UnitName = Literal[UNIT_TYPES]


def _subset(value: list[str], allowed: tuple[str, ...], name: str) -> list[str]:
    """``value`` without repeats, if it is a non-empty subset of ``allowed``."""
    if not value or any(v not in allowed for v in value):
        raise ValueError(f"{name} must be a non-empty subset of {list(allowed)}, got {value}")
    return list(dict.fromkeys(value))


_Section = Options  # every section: unknown keys are errors, no NaN/inf


class CalibrateParams(_Section):
    source: str = Field("corpus", description="'corpus', a .txt/.jsonl path, or hf:NAME")
    n_windows: int = Field(64, ge=1, description="calibration windows")
    seqlen: int = Field(256, ge=2, description="tokens per window")
    seed: int = 0


PATTERN_WORDS = {DEVICES: DEVICE_WORDS, WORKERS: WORKERS_WORDS}  # what a pattern error says instead of the regex


class RuntimeParams(_Section):
    """Where the stages run: the device and the dtype models compute in (saved checkpoints keep their input's)."""
    # YAML (params.yaml, --set) reads `workers: 2` and `max_memory: 1000000000` as numbers: the count, the bytes
    model_config = ConfigDict(**_Section.model_config, coerce_numbers_to_str=True)
    device: str = Field("auto", pattern=DEVICES,
                        description="auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="compute dtype; auto: the checkpoint's own")
    max_memory: str | None = Field(
        None, description="memory budget, e.g. 512MiB, 20GiB: a model whose weights exceed it is streamed a block "
                          "at a time and the run holds at most this much at once (blocks, activations, a chunk of "
                          "logits, solves; methods that stream: see `pruneflow methods`); null: load the whole "
                          "model")
    workers: str = Field(
        "local", pattern=WORKERS,
        description="where candidate sub-models are evaluated: local (this process) | N (Ray workers, local "
                    "instance or RAY_ADDRESS) | auto (one per GPU/CPU of the cluster) | ray://HOST:PORT")

    @field_validator("max_memory")
    @classmethod
    def _size(cls, value):
        if value is not None:
            try:
                parse_size(value)
            except PruneflowError as err:
                raise ValueError(str(err)) from None
        return value


class ScoreParams(_Section):
    method: MethodName = Field("flap", description="importance method (see `pruneflow methods`)")
    objective: Literal["auto", "loss", "kl", "hidden"] = Field(
        "auto", description="what candidate sub-models are measured by where a method (bonsai, sleb, blockpruner) "
                            "or prune.allocation: search scores them: next-token loss, KL to the unmasked model's "
                            "next-token distribution (causal LMs), or 1 − cos of the final hidden states to the "
                            "unmasked model's (any model); auto: the paper's (loss; hidden on an encoder)")
    bonsai: BonsaiParams = Field(default_factory=BonsaiParams)
    expert_drop: ExpertDropParams = Field(default_factory=ExpertDropParams)
    laco: LacoParams = Field(default_factory=LacoParams)

    @field_validator("method", mode="before")
    @classmethod
    def _known(cls, value):
        if isinstance(value, str) and value not in METHODS:
            raise ValueError(f"unknown method {value!r}; available: {', '.join(sorted(METHODS))}")
        return value


class PruneParams(_Section):
    ratio: float = Field(0.3, gt=0, lt=1, description="fraction of non-embedding parameters to remove")
    allocation: Literal[("auto", *ALLOCATIONS)] = Field(
        "auto", description="same share from every layer, ranked across layers (non-uniform widths), or searched "
                            "per layer from the method's own plan (calibration loss); auto: the method's own "
                            "(global for flap, bonsai, taylor and depth, else uniform)")
    search: SearchParams = Field(default_factory=SearchParams, description="allocation: search settings")
    units: Literal["auto"] | list[UnitName] = Field(
        "auto", description="unit types to remove: heads, channels (MLP), layers, hidden (the embedding "
                            "dimension, alone); auto: the method's own")
    head_mode: Literal["auto", "query", "group"] = Field(
        "auto", description="GQA head unit: a query head from every group, a whole KV group, or the finer")
    round_to: int = Field(1, ge=1, description="keep MLP widths a multiple of this")
    reconstruct: Literal[("auto", *RECONSTRUCTIONS)] = Field(
        "auto", description="what replaces the removed units: none; bias (FLAP: their mean contribution as an "
                            "o_proj/down_proj bias); lstsq (re-fit the kept input columns of o_proj/down_proj to the "
                            "dense block's outputs, block by block); auto: the method's own (bias for flap, else none)")

    @model_validator(mode="before")
    @classmethod
    def _compensate(cls, data):
        # ``compensate: true|false``, the key before prune.reconstruct, is still read
        if isinstance(data, dict) and "compensate" in data:
            data = dict(data)
            value = data.pop("compensate")
            if "reconstruct" in data:
                raise ValueError("prune.compensate is the old name of prune.reconstruct; give only reconstruct")
            if not isinstance(value, bool):
                raise ValueError(f"prune.compensate must be true or false, got {value!r}")
            data["reconstruct"] = "bias" if value else "none"
        return data

    @field_validator("units", mode="before")
    @classmethod
    def _units(cls, value):
        if value == "auto" or not isinstance(value, list):
            return value
        return _subset([ALIASES.get(v, v) for v in value], UNIT_TYPES, "units")

    def for_method(self, method: str) -> "PruneParams":
        """These settings with ``auto`` replaced by what it means for ``method``."""
        entry = METHODS[method]
        return self.model_copy(update={"allocation": entry.allocation if self.allocation == "auto" else self.allocation,
                                       "units": list(entry.auto_units or entry.units) if self.units == "auto"
                                       else self.units,
                                       "reconstruct": entry.reconstruct if self.reconstruct == "auto"
                                       else self.reconstruct})


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LoraTarget = Literal[LORA_TARGETS]  # choices in the Prefect form


class RecoverParams(_Section):
    """LoRA recovery (peft) of the pruned model on the calibration source's train split."""
    enabled: bool = Field(True, description="run LoRA recovery after pruning (false: the stage only records a skip)")
    targets: list[LoraTarget] = Field(default_factory=lambda: list(LORA_TARGETS),
                               description="ArchSpec projections that get LoRA adapters")
    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale alpha/r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (linear warm-up, then linear decay to 0)")
    warmup_steps: int = Field(10, ge=0)
    steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="windows per step")
    seqlen: int = Field(256, ge=2, description="tokens per training window")
    distill_weight: float = Field(0.01, ge=0, description="λ in CE + λ·KL(dense ‖ pruned); 0: no teacher")
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto", description="recompute block activations in the backward pass; auto: when a batch's activations "
                            "would outweigh the weights")
    seed: int = 0

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value):
        return _subset(value, LORA_TARGETS, "targets") if isinstance(value, list) else value


class EvaluateParams(_Section):
    source: str = Field("corpus", description="held-out text for perplexity: 'corpus' (the packaged test split), "
                                              "a .txt/.jsonl file, or hf:NAME[:CONFIG][:SPLIT], e.g. "
                                              "hf:wikitext:wikitext-2-raw-v1:test (the field's protocol)")
    ppl_seqlen: int = Field(256, ge=2, description="window length of the perplexity protocol (context length; "
                                                   "windows do not overlap)")
    max_windows: int | None = Field(None, ge=1, description="cap on test windows (None: the whole split)")
    speed: bool = True
    decode_tokens: int = Field(64, ge=1)
    llama_cpp: bool = Field(False, description="also prefill/decode speed in llama.cpp: each model exported to a "
                                               "temporary GGUF (its own dtype) and measured round-robin (needs "
                                               "llama-cpp-python)")
    tasks: list[str] = Field(
        default_factory=lambda: ["pruneflow_word_order", "pruneflow_next_sentence"],
        description="lm-eval tasks: the local ones made from the held-out split, or standard names (arc_easy, ...)")
    task_examples: int = Field(200, ge=20, description="examples per local task")
    task_limit: int | None = Field(None, ge=1, description="lm-eval limit: examples per task (None: all)")
    task_batch_size: int = Field(16, ge=1, description="lm-eval batch size (set on the in-memory HFLM)")
    max_ppl_ratio: float = Field(1.5, gt=1, description="quality gate: final test ppl / dense test ppl at most")
    min_task_ratio: float = Field(0.9, gt=0, le=1, description="quality gate: final / dense accuracy, every task")
    ratio_tolerance: float = Field(0.02, ge=0, lt=1, description="quality gate: |achieved − prune.ratio| at most")

    @field_validator("llama_cpp")
    @classmethod
    def _llama_cpp(cls, value: bool) -> bool:
        import importlib.util

        if value and importlib.util.find_spec("llama_cpp") is None:
            raise ValueError("needs llama-cpp-python, which is not installed (pip install llama-cpp-python; it "
                             "builds llama.cpp from source, ~10 min on 2 cores)")
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if value.startswith("hf:"):

            try:
                parse_hf(value)
            except PruneflowError as err:
                raise ValueError(str(err)) from None
        return value

    @field_validator("tasks")
    @classmethod
    def _local_tasks(cls, value: list[str]) -> list[str]:
        # standard names are checked against lm-eval's index by the evaluate stage (building it takes ~10 s)
        typos = [t for t in value if t.startswith("pruneflow_") and t not in LOCAL_TASKS]
        if typos:
            raise ValueError(f"unknown local task {', '.join(typos)}; local tasks: {', '.join(LOCAL_TASKS)}")
        return list(dict.fromkeys(value))


ExportFormat = Literal["gguf", "onnx", "vllm"]  # choices in the Prefect form
QuantType = Literal["q8_0", "q6_k", "q5_k_m", "q4_k_m"]  # = model.quantize.QUANT_TYPES (params stays torch-free)


class ExportParams(_Section):
    formats: list[ExportFormat] = Field(
        default_factory=list, description="the final model (recovered, else pruned) also as: gguf (llama.cpp, "
        "artifacts/export/model.gguf), onnx (ONNX Runtime, artifacts/export/onnx/), vllm (nemotron-nas for vLLM's "
        "per-layer widths, artifacts/export/vllm/); []: nothing exported")
    dtype: Literal["auto", "f32", "f16", "bf16"] = Field(
        "auto", description="GGUF matrices: auto (the checkpoint's dtype), f32, f16 or bf16 (ONNX is float32)")
    quantize: list[QuantType] = Field(
        default_factory=list, description="the GGUF also quantized by llama.cpp's quantizer, one file per type "
        "(artifacts/export/model-TYPE.gguf): q8_0, q6_k, q5_k_m, q4_k_m; needs gguf in formats")

    @field_validator("formats")
    @classmethod
    def _formats(cls, value: list[str]) -> list[str]:
        import importlib.util

        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if "onnx" in value and missing:
            raise ValueError(f"onnx needs {', '.join(missing)}, which is not installed (pip install "
                             f"'pruneflow[onnx]')")
        return list(dict.fromkeys(value))

    @field_validator("quantize")
    @classmethod
    def _quantize(cls, value: list[str]) -> list[str]:
        import importlib.util

        if value and importlib.util.find_spec("llama_cpp") is None:
            raise ValueError("quantizing needs llama.cpp's quantizer from llama-cpp-python, which is not installed "
                             "(pip install llama-cpp-python)")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _quantize_needs_gguf(self):
        if self.quantize and "gguf" not in self.formats:
            raise ValueError(f"quantize: {', '.join(self.quantize)} quantizes the GGUF export: add gguf to "
                             f"export.formats")
        return self


class Params(_Section):
    model: str = Field("models/reference", description="checkpoint directory, or hub id ORG/NAME[@REVISION]")
    runtime: RuntimeParams = Field(default_factory=RuntimeParams)
    calibrate: CalibrateParams = Field(default_factory=CalibrateParams)
    score: ScoreParams = Field(default_factory=ScoreParams)
    prune: PruneParams = Field(default_factory=PruneParams)
    recover: RecoverParams = Field(default_factory=RecoverParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    export: ExportParams = Field(default_factory=ExportParams)

    @model_validator(mode="after")
    def _method_fits(self):
        check_method(self.score.method, self.prune)
        return self

    @model_validator(mode="after")
    def _bonsai_windows(self):
        if self.score.method == "bonsai" and self.score.bonsai.n_windows > self.calibrate.n_windows:
            raise ValueError(f"score.bonsai.n_windows={self.score.bonsai.n_windows} exceeds "
                             f"calibrate.n_windows={self.calibrate.n_windows}")
        return self


def check_method(method: str, cfg: PruneParams) -> None:
    """Refuse unit types or an allocation the method does not support (before any model is loaded)."""
    entry, resolved = METHODS[method], cfg.for_method(method)
    extra = [u for u in resolved.units if u not in entry.units]
    if extra:
        depth = sorted(m.name for m in METHODS.values() if m.depth)
        hint = (f"depth methods ({', '.join(depth)}) remove layers" if "layers" in extra
                else f"use units: [{', '.join(entry.auto_units or entry.units)}] (or auto) with it")
        raise ValueError(f"prune.units: method {method} scores {', '.join(entry.units)}, not {', '.join(extra)}; "
                         f"{hint}")
    if resolved.allocation not in entry.allocations:
        raise ValueError(f"prune.allocation: {method} removes units {' or '.join(entry.allocations)}ly across "
                         f"layers and modules; set prune.allocation: {entry.allocations[0]} or auto "
                         f"(got {resolved.allocation})")
    problems = []  # every conflict at once: switching the method may need more than one key changed
    if "hidden" in resolved.units and len(resolved.units) > 1:
        problems.append(f"prune.units: hidden channels are pruned on their own (units: [hidden]), not with "
                        f"{', '.join(u for u in resolved.units if u != 'hidden')}")
    if "experts" in resolved.units and len(resolved.units) > 1:
        problems.append(f"prune.units: experts are pruned on their own (units: [experts]), not with "
                        f"{', '.join(u for u in resolved.units if u != 'experts')}")
    if "experts" in resolved.units and resolved.reconstruct != "none":
        problems.append(f"prune.reconstruct: {resolved.reconstruct} re-fits o_proj/down_proj inputs; experts are "
                        f"removed whole: use reconstruct: none (or auto)")
    if "hidden" in resolved.units and resolved.reconstruct != "none":
        problems.append(f"prune.reconstruct: {resolved.reconstruct} re-fits o_proj/down_proj inputs; hidden "
                        f"channels are their outputs: use reconstruct: none (or auto)")
    if resolved.allocation == "search" and (entry.depth or "channels" not in resolved.units
                                            or "layers" in resolved.units):
        problems.append(f"prune.allocation: search moves heads and MLP channels between layers and balances the "
                        f"exact ratio with channels; it needs units including channels and not layers "
                        f"(method {method}, units {resolved.units}): use allocation: auto")
    if resolved.reconstruct != "none" and entry.depth:
        problems.append(f"prune.reconstruct: {resolved.reconstruct} re-fits the projections of sliced blocks; "
                        f"{method} removes whole blocks: use reconstruct: none (or auto)")
    elif resolved.reconstruct != "none" and "layers" in resolved.units:
        problems.append(f"prune.reconstruct: {resolved.reconstruct} is for heads and channels; "
                        f"units include layers: use reconstruct: none (or auto)")
    if problems:
        raise ValueError("; ".join(problems))


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(part) for part in (prefix, *e["loc"]) if part != "")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "string_pattern_mismatch" and e["ctx"]["pattern"] in PATTERN_WORDS:
            msg = f"use {PATTERN_WORDS[e['ctx']['pattern']]}"
        # the value, unless our own check quotes it already; a check across fields names its own fields
        quoted = e["type"] == "value_error" and repr(e["input"]) in msg
        got = f", got {e['input']!r}" if e["type"] != "missing" and not isinstance(e["input"], dict) and not quoted else ""
        lines.append(f"{key}: {msg}{got}" if key else msg)
    return "; ".join(lines)


def validate(model_cls: type[BaseModel], data: dict, prefix: str = ""):
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise PruneflowError(format_validation_error(err, prefix)) from None


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise PruneflowError(f"--set {dotted}: {part} is not a section")
    node[leaf] = value


def load_params(path: Path | None = None, overrides: list[str] = (), updates: dict | None = None) -> Params:
    """Params from a YAML file (or defaults), then ``key.sub=value`` overrides (values parsed as YAML) and
    ``updates`` (dotted key → Python value) applied, validated as one tree."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise PruneflowError(f"params file {path} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise PruneflowError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise PruneflowError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise PruneflowError(f"--set {item!r}: expected KEY=VALUE")
        _set(data, key.strip(), yaml.safe_load(value))
    for key, value in (updates or {}).items():
        _set(data, key, value)
    return validate(Params, data)
