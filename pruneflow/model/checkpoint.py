"""Checkpoints: safetensors + config + plan, loadable with ``from_pretrained``.

A plan whose widths are the same in every layer, and that a stock config can describe, is saved with a
vanilla config (plain ``AutoModelForCausalLM.from_pretrained(dir)``). Anything else — per-layer widths, a
FLAP bias on o_proj/down_proj alone, a head count the config validation rejects — gets a
``pruneflow_<type>`` config with per-layer widths and ``modeling_pruneflow.py`` beside it, loaded by
``from_pretrained(dir, trust_remote_code=True)`` or, without remote code, by :func:`load`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from pruneflow.model import arch as A
from pruneflow.model import mlp, modeling_pruneflow
from pruneflow.execution import streaming
from pruneflow.execution.lineage import note_origin
from pruneflow.model.arch import ArchSpec
from pruneflow.atomic import atomic_dir
from pruneflow.errors import PruneflowError
from pruneflow.execution.runtime import Runtime
from pruneflow.sizes import format_size, parse_size
from pruneflow.model.sources import ModelSource, resolve

SHARD_SIZE = "5GB"  # the hub's convention: a 70B model is ~30 files, not one 140 GB file
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}

log = logging.getLogger(__name__)

PRUNEFLOW_KEYS = ("pruneflow_layers", "pruneflow_arch", "auto_map")


def _stock_classes(model: nn.Module, model_type: str):
    """The stock transformers config and model classes behind a (possibly pruned) model."""
    config_cls, _, _ = modeling_pruneflow.CLASSES[model_type]
    stock_model = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers."))
    return config_cls.__mro__[1], stock_model


def _base_dict(config) -> dict:
    data = config.to_dict()
    for key in PRUNEFLOW_KEYS + ("architectures", "transformers_version", "model_type"):
        data.pop(key, None)
    return data


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def vanilla_config(model: nn.Module, spec: ArchSpec):
    """A stock config that builds exactly this model's shapes, or None if none can."""
    widths = A.layer_widths(model, spec)
    if any(w != widths[0] for w in widths):
        return None
    model_type = A.base_model_type(model.config.model_type)
    config_cls, model_cls = _stock_classes(model, model_type)
    data = _base_dict(model.config)
    data["num_attention_heads"] = widths[0]["heads"]
    mlp.of(spec).write_width(data, widths[0])
    if "num_key_value_heads" in data:
        data["num_key_value_heads"] = widths[0]["kv_heads"]
    data["head_dim"] = A.geometry(model.config).head_dim  # explicit: a stock config may not carry it (qwen2)
    try:
        candidate = config_cls(**data)
        with torch.device("meta"):
            reference = model_cls(candidate)
    except (ValueError, TypeError, StrictDataclassError) as err:  # the config's own validation said no
        reason = str(getattr(err, "__cause__", None) or err).strip().splitlines()[-1].strip()
        log.info("no stock config describes this plan (%s): saving with the per-layer loader", reason)
        return None
    return candidate if _shapes(reference) == _shapes(model) else None


def pruned_config(model: nn.Module, spec: ArchSpec):
    """A ``pruneflow_<type>`` config: the dense base config plus per-layer widths and module paths."""
    model_type = A.base_model_type(model.config.model_type)
    config_cls, model_cls, auto_key = modeling_pruneflow.CLASSES[model_type]
    config = config_cls(**_base_dict(model.config), pruneflow_layers=A.layer_widths(model, spec),
                        pruneflow_arch=spec.to_dict())
    config.auto_map = {"AutoConfig": f"modeling_pruneflow.{config_cls.__name__}",
                       auto_key: f"modeling_pruneflow.{model_cls.__name__}"}
    config.architectures = [model_cls.__name__]
    return config


def save(model: nn.Module, tokenizer, out_dir: Path, spec: ArchSpec, extra_files: dict[str, str] | None = None,
         overwrite: bool = False, dtype: torch.dtype | None = None, max_shard_size: str | int = SHARD_SIZE,
         runtime: Runtime | None = None) -> dict:
    """Write the checkpoint atomically: everything goes to a temp dir renamed to ``out_dir`` at the end.

    ``dtype`` (the input checkpoint's, see :func:`stored_dtype`) is what the weights are written in: a model
    scored in float32 is cast to it first, in place. Weights above ``max_shard_size`` are sharded
    (``model.safetensors.index.json``). A streamed model (see :mod:`pruneflow.execution.streaming`) is sliced block by
    block as it is written, in shards no larger than its memory budget allows.
    """
    streamed = streaming.is_streamed(model)
    if dtype is not None and model.dtype != dtype and not streamed:
        model.to(dtype)
    config = vanilla_config(model, spec)
    vanilla = config is not None
    config = config if vanilla else pruned_config(model, spec)
    with atomic_dir(out_dir, overwrite) as tmp:
        if streamed:
            shard = streaming.shard_limit(parse_size(max_shard_size), runtime.max_memory if runtime else None)
            dtype = dtype or streaming.stream_of(model).dtype
            streaming.write_weights(model, spec, tmp, dtype, shard, runtime)
            config.dtype = dtype  # what save_pretrained records of a model cast to it
            config.architectures = [type(model).__name__]  # as save_pretrained records it
            config.save_pretrained(tmp)
            if model.can_generate() and model.generation_config is not None:
                model.generation_config.save_pretrained(tmp)
        else:
            original = model.config
            model.config = config
            try:
                model.save_pretrained(tmp, max_shard_size=max_shard_size)
            finally:
                model.config = original
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if not vanilla:
            shutil.copy(Path(modeling_pruneflow.__file__), tmp / "modeling_pruneflow.py")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        info = {"vanilla": vanilla, "loader": "from_pretrained(dir)" if vanilla else
                "from_pretrained(dir, trust_remote_code=True) or pruneflow.load(dir)"}
        (tmp / "pruneflow.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def read_config(path: Path | str | ModelSource) -> dict:
    """config.json of a checkpoint directory or hub id, as a dict."""
    path = path.path if isinstance(path, ModelSource) else resolve(path).path
    config_file = path / "config.json"
    if not config_file.exists():
        raise PruneflowError(f"{path} has no config.json; not a transformers checkpoint")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise PruneflowError(f"{config_file} is not valid JSON: {err}") from err


def weight_dtypes(path: Path) -> dict[torch.dtype, int]:
    """Bytes per dtype of a checkpoint's safetensors weights (headers only; sharded or not), validating them."""
    weight_files = sorted(path.glob("*.safetensors"))
    if not weight_files:
        raise PruneflowError(f"{path} has no *.safetensors weights (only safetensors checkpoints are loaded)")
    sizes: dict[torch.dtype, int] = {}
    for weights in weight_files:
        try:
            with safe_open(weights, framework="pt") as f:
                for name in f.keys():
                    part = f.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(part.get_dtype())
                    if dtype is not None:
                        numel = 1
                        for n in part.get_shape():
                            numel *= n
                        sizes[dtype] = sizes.get(dtype, 0) + numel * dtype.itemsize
        except (SafetensorError, OSError) as err:
            raise PruneflowError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    return sizes


def stored_dtype(path: Path | str | ModelSource) -> torch.dtype:
    """The floating dtype most of a checkpoint's weight bytes are stored in (what a pruned copy is saved in)."""
    path = path.path if isinstance(path, ModelSource) else resolve(path).path
    sizes = weight_dtypes(path)
    if not sizes:
        raise PruneflowError(f"checkpoint {path} has no floating-point weights")
    return max(sizes, key=sizes.get)


def compute_size(source: Path | str | ModelSource, runtime: Runtime) -> tuple[torch.dtype, int]:
    """(the dtype the runtime computes this checkpoint in, its weights' bytes in that dtype), from the headers."""
    path = source.path if isinstance(source, ModelSource) else resolve(source).path
    sizes = weight_dtypes(path)
    dtype = runtime.compute_dtype(max(sizes, key=sizes.get) if sizes else torch.float32)
    return dtype, sum(n * dtype.itemsize // d.itemsize for d, n in sizes.items())


def load(source: Path | str | ModelSource, runtime: Runtime | None = None, with_tokenizer: bool = True,
         stream: bool = False, calibration: tuple[int, int] = (0, 0), purpose: str = "this step"):
    """Load any checkpoint pruneflow can prune or has written (a directory or a hub id), without remote code.

    Returns ``(model, tokenizer, spec)``; the model is in eval mode, in the runtime's dtype (by default the
    checkpoint's own) and placed as the runtime says (one device, or several GPUs under a device map). When its
    weights exceed the runtime's ``max_memory``: with ``stream``, the model's streamed skeleton (weights stay
    on disk; ``calibration`` = (windows, tokens each) sizes the activations the budget must also hold), else a
    clear error saying ``purpose`` needs the whole model.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    runtime = runtime or Runtime()
    source = source if isinstance(source, ModelSource) else resolve(source)
    path = source.path
    model_type = read_config(source).get("model_type", "")
    spec = A.arch_for(model_type)
    dtype, weight_bytes = compute_size(path, runtime)
    pruned = model_type.startswith(A.PRUNED_PREFIX)
    if runtime.streams(weight_bytes):
        if not stream:
            raise PruneflowError(f"{purpose} needs the whole model in memory ({format_size(weight_bytes)} of "
                                 f"weights); --max-memory is {format_size(runtime.max_memory)}: raise it, or "
                                 f"use a step that streams (see README, 'Models larger than memory')")
        model = _skeleton(path, spec, pruned, dtype, runtime, calibration)
        note_origin(model, source, stream, calibration)
        return model, load_tokenizer(path, model.config) if with_tokenizer else None, spec
    placement = runtime.placement(weight_bytes)
    try:
        if pruned:
            config_cls, model_cls, _ = modeling_pruneflow.CLASSES[A.base_model_type(model_type)]
            model = model_cls.from_pretrained(path, dtype=dtype, **placement)
        else:
            auto = AutoModelForCausalLM if spec.causal_lm else AutoModel
            model = auto.from_pretrained(path, config=AutoConfig.from_pretrained(path), dtype=dtype, **placement)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise PruneflowError(f"cannot load checkpoint {source.name}: {str(err).splitlines()[0][:300]}") from err
    streaming.count_read(sum(f.stat().st_size for f in Path(path).glob("*.safetensors")))
    for name, tensor in model.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise PruneflowError(f"checkpoint {path}: weight {name} contains NaN or Inf")
    model.eval()
    note_origin(model, source, stream, calibration)
    tokenizer = load_tokenizer(path, model.config) if with_tokenizer else None
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise PruneflowError(f"checkpoint {path}: tokenizer has {len(tokenizer)} tokens but the model's "
                             f"embedding only {model.get_input_embeddings().num_embeddings}")
    return model, tokenizer, spec


def _skeleton(path: Path, spec: ArchSpec, pruned: bool, dtype: torch.dtype, runtime: Runtime,
              calibration: tuple[int, int]) -> nn.Module:
    """The streamed skeleton of the checkpoint at ``path`` (see :mod:`pruneflow.execution.streaming`), after checking that
    the budget holds what streaming keeps in memory at once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = streaming.LazyWeights(path)
    if pruned:
        config_cls, model_cls, _ = modeling_pruneflow.CLASSES[A.base_model_type(read_config(path)["model_type"])]
        config, build = config_cls.from_pretrained(path), model_cls._from_config
    else:
        config, build = AutoConfig.from_pretrained(path), AutoModelForCausalLM.from_config
    if runtime.device.type == "cuda":  # the budget is what this one GPU may hold
        free = torch.cuda.mem_get_info(runtime.device)[0]
        if runtime.max_memory > free:
            raise PruneflowError(f"--max-memory {format_size(runtime.max_memory)} exceeds the free memory of "
                                 f"{runtime.device} ({format_size(free)})")
    streaming.check_budget(weights, config, spec, dtype, runtime.max_memory, *calibration)
    return streaming.skeleton(build, config, spec, weights, dtype, runtime.device)


def load_tokenizer(path: Path | str | ModelSource, config=None):
    """A checkpoint's tokenizer, without remote code.

    The config is passed explicitly (read with pruneflow's own classes for per-layer checkpoints): otherwise
    AutoTokenizer reads config.json's ``auto_map`` and asks interactively whether to run remote code.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = path.path if isinstance(path, ModelSource) else resolve(path).path
    if config is None:
        model_type = read_config(path).get("model_type", "")
        A.arch_for(model_type)
        if model_type.startswith(A.PRUNED_PREFIX):
            config = modeling_pruneflow.CLASSES[A.base_model_type(model_type)][0].from_pretrained(path)
        else:
            config = AutoConfig.from_pretrained(path)
    try:
        return AutoTokenizer.from_pretrained(path, config=config, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise PruneflowError(f"cannot load the tokenizer of {path}: {str(err).splitlines()[0][:300]}") from err
