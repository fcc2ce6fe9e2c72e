"""Export a checkpoint as ``nemotron-nas`` (DeciLM): the per-layer format vLLM (and SGLang, TensorRT-LLM) serve.

vLLM's ``DeciLMForCausalLM`` builds each block from ``config.block_configs[i]``: ``attention.no_op`` (no
attention), ``attention.n_heads_in_group`` (its KV heads = ``num_attention_heads / n``), ``ffn.no_op`` (no MLP),
``ffn.intermediate_size`` (its exact width), ``ffn.hidden_act``. Query heads, head_dim and hidden size are
global. So per-layer MLP widths, per-layer KV heads, removed blocks and removed sub-blocks are servable; per-layer
query heads are not, and FLAP's o_proj/down_proj biases have no place (DeciLM's output projections have a bias only
if every block's has one). What does not fit is refused before anything is written, naming a recipe that does.

Facts of vLLM's loader this writer follows (``vllm/model_executor/models/nemotron_nas.py``, 0.32):
- a no-op sub-block has no weights at all (no projections, no norm), so none is written;
- a block whose attention is a no-op adds its MLP to a residual stream that an earlier block must have started:
  vLLM fails (its fused add-norm gets no residual) when the first block that does anything has an MLP but no
  attention. Such a block is written with a zero attention (every query head over one KV head, all weights zero:
  it adds exactly 0), as the GGUF export does for llama.cpp;
- the config class is not in transformers: ``configuration_decilm.py`` is shipped in the directory (vLLM loads
  it with ``trust_remote_code``).
Weights keep their stored dtype and Llama tensor names, read one tensor at a time (never the whole model) and
written in shards of at most ``max_shard_size`` into a temporary directory renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pruneflow.atomic import atomic_dir, check_output_dir
from pruneflow.errors import PruneflowError
from pruneflow.execution.streaming import LazyWeights, ShardWriter
from pruneflow.model import arch as A
from pruneflow.model import checkpoint as C
from pruneflow.model import configuration_decilm
from pruneflow.model.sources import ModelSource, resolve
from pruneflow.sizes import parse_size

log = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2")  # Llama-shaped blocks: DeciLM's (no q/k norms, no experts)
# the recipe that vLLM serves with per-layer widths: query heads kept, MLP widths searched, no output bias
SERVABLE = "--units channels --allocation global --reconstruct lstsq"
GLOBAL = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
BLOCK = {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
         "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_proj.bias",
         "self_attn.k_proj.bias", "self_attn.v_proj.bias", "mlp.gate_proj.weight", "mlp.up_proj.weight",
         "mlp.down_proj.weight"}
ATTENTION = ("input_layernorm", "self_attn.")
FFN = ("post_attention_layernorm", "mlp.")
TOKENIZER_FILES = re.compile(r"(tokenizer.*|special_tokens_map\.json|generation_config\.json|vocab\..*|merges\.txt|"
                             r".*\.model|chat_template\..*)")


@dataclass
class DeciBlock:
    heads: int
    kv_heads: int
    channels: int
    zero_attention: bool = False  # written with a zero attention (module docstring)


def check_family(config: dict) -> str:
    """What vLLM's nemotron-nas cannot hold whatever the plan: an error naming it and what does serve. Cheap
    (the config only), so a pipeline that exports checks it before any work."""
    family = A.base_model_type(config.get("model_type", ""))
    if family in FAMILIES:
        return family
    if family in ("qwen3", "qwen3_moe", "mixtral"):
        what = "q/k norms" if family == "qwen3" else "experts"
        raise PruneflowError(f"vLLM's per-layer format (nemotron-nas) has no {what}, so a {family} model is "
                             f"servable in vLLM only as a vanilla checkpoint, which vLLM loads from its directory "
                             f"as it is: prune it with --allocation uniform")
    raise PruneflowError(f"model type {family or '?'!r} has no vLLM per-layer export (supported: "
                         f"{', '.join(FAMILIES)})")


def check_plan(config: dict, units: list[str], allocation: str, reconstruct: str) -> None:
    """Before pruning: whether the checkpoint a plan will give can be written as nemotron-nas."""
    check_family(config)
    if reconstruct == "bias":
        raise PruneflowError(f"vLLM's nemotron-nas has no per-block o_proj/down_proj bias (FLAP's reconstruct: "
                             f"bias); prune with {SERVABLE}")
    if "heads" in units and allocation != "uniform":
        raise PruneflowError(f"vLLM's nemotron-nas holds one query-head count for every block, and "
                             f"{allocation} allocation of heads gives each block its own; prune with {SERVABLE} "
                             f"(or heads with --allocation uniform)")


def read_blocks(config: dict, weights: LazyWeights) -> tuple[list[DeciBlock], bool]:
    """Per-block widths from the weights' shapes (vanilla and per-layer checkpoints alike) and whether q/k/v
    have biases (Qwen2); everything vLLM's DeciLM cannot hold is refused here, before any write."""
    family = check_family(config)
    names = weights.tensors
    unknown = [n for n in names if n not in GLOBAL and not (
        re.fullmatch(r"model\.layers\.\d+\.(.+)", n) and n.split(".", 3)[3] in BLOCK)]
    biases = [n for n in unknown if n.endswith(("o_proj.bias", "down_proj.bias"))]
    if biases:
        raise PruneflowError(f"{biases[0]}: vLLM's nemotron-nas has no per-block o_proj/down_proj bias (FLAP's "
                             f"reconstruct: bias); prune with {SERVABLE}")
    if unknown:
        raise PruneflowError(f"tensor(s) {', '.join(unknown[:3])} have no place in a nemotron-nas {family} model")
    for name in GLOBAL[:2]:
        if name not in names:
            raise PruneflowError(f"checkpoint {weights.path} lacks {name} (truncated or not a causal LM?)")
    head_dim = A.head_dim_in(config)
    count = 1 + max((int(n.split(".")[2]) for n in names if n.startswith("model.layers.")), default=-1)

    def rows(i: int, proj: str) -> int:
        name = f"model.layers.{i}.{proj}.weight"
        return names[name].shape[0] if name in names else 0

    blocks = [DeciBlock(rows(i, "self_attn.q_proj") // head_dim, rows(i, "self_attn.k_proj") // head_dim,
                        rows(i, "mlp.up_proj")) for i in range(count)]
    heads = sorted({b.heads for b in blocks if b.heads})
    if len(heads) > 1:
        raise PruneflowError(f"blocks keep {', '.join(map(str, heads))} query heads: vLLM's nemotron-nas holds one "
                             f"query-head count for every block; prune with {SERVABLE} (or heads with --allocation "
                             f"uniform)")
    if not heads:
        raise PruneflowError("no block keeps attention: vLLM needs at least one attention block")
    for i, b in enumerate(blocks):
        if b.heads and (not b.kv_heads or b.heads % b.kv_heads):
            raise PruneflowError(f"block {i}: {b.heads} query heads over {b.kv_heads} KV heads; vLLM needs a "
                                 f"whole number of query heads per KV head")
    first = next((b for b in blocks if b.heads or b.channels), None)
    if first is not None and not first.heads:  # its MLP would find no residual stream in vLLM
        first.heads, first.kv_heads, first.zero_attention = heads[0], 1, True
    qkv_bias = any(n.endswith("q_proj.bias") for n in names)
    return blocks, qkv_bias


def deci_config(config: dict, blocks: list[DeciBlock], qkv_bias: bool, dtype: torch.dtype) -> dict:
    """The nemotron-nas config.json: the source's global settings and one block_config per block."""
    act = config.get("hidden_act", "silu")
    heads = next(b.heads for b in blocks if b.heads)
    keep = ("vocab_size", "hidden_size", "rms_norm_eps", "max_position_embeddings", "rope_parameters",
            "rope_theta", "rope_scaling", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
            "initializer_range")
    block_configs = [{"attention": {"no_op": not b.heads, "replace_with_linear": False,
                                    "n_heads_in_group": heads // b.kv_heads if b.heads else None},
                      "ffn": {"no_op": not b.channels, "replace_with_linear": False,
                              "intermediate_size": b.channels or None, "hidden_act": act}} for b in blocks]
    return {"architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas",
            "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig"},
            **{k: config[k] for k in keep if config.get(k) is not None},
            "num_hidden_layers": len(blocks), "num_attention_heads": heads,
            "num_key_value_heads": next(b.kv_heads for b in blocks if b.heads),
            "head_dim": A.head_dim_in(config),
            "hidden_act": act, "attention_bias": False, "qkv_bias": qkv_bias, "mlp_bias": False,
            "dtype": str(dtype).removeprefix("torch."), "block_configs": block_configs}


def export_vllm(checkpoint: str | Path | ModelSource, out_dir: Path, overwrite: bool = False,
                max_shard_size: str = "5GB") -> dict:
    """Write ``checkpoint`` as a nemotron-nas directory vLLM loads (``LLM(out_dir, trust_remote_code=True)``);
    returns a summary (blocks, widths, no-op sub-blocks, bytes). Every check runs before the directory is made."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    source = checkpoint if isinstance(checkpoint, ModelSource) else resolve(checkpoint)
    config = C.read_config(source)
    weights = LazyWeights(source.path)
    blocks, qkv_bias = read_blocks(config, weights)
    dtype = C.stored_dtype(source)
    if config.get("sliding_window") and config.get("use_sliding_window", True):
        log.warning("sliding_window %s is not written: vLLM's DeciLM attends to the whole context (exact up to "
                    "that many tokens)", config["sliding_window"])
    limit = parse_size(max_shard_size)
    cpu = torch.device("cpu")
    with atomic_dir(out_dir, overwrite) as tmp:
        writer = ShardWriter(tmp, limit)
        total = sum(tensor.nbytes(dtype) for tensor in weights.tensors.values())
        with tqdm(total=total, desc=f"writing {out_dir.name}", unit="B", unit_scale=True, leave=False) as bar:
            for name in weights.tensors:
                size, parts = weights.tensors[name].nbytes(dtype), name.split(".", 3)
                b = blocks[int(parts[2])] if name.startswith("model.layers.") else None
                # a no-op sub-block has no weights (a zero attention gets its own below)
                if b is None or not ((parts[3].startswith(ATTENTION) and (not b.heads or b.zero_attention)) or
                                     (parts[3].startswith(FFN) and not b.channels)):
                    writer.make_room(size)
                    writer.add(name, weights.read([name], dtype, cpu)[name])
                bar.update(size)
        head_dim = A.head_dim_in(config)
        for i, b in enumerate(blocks):
            if b.zero_attention:
                hidden, q, kv = config["hidden_size"], b.heads * head_dim, b.kv_heads * head_dim
                zeros = {"self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
                         "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q)}
                if qkv_bias:
                    zeros.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                                  "self_attn.v_proj.bias": (kv,)})
                for key, shape in zeros.items():
                    writer.add(f"model.layers.{i}.{key}", torch.zeros(shape, dtype=dtype))
                writer.add(f"model.layers.{i}.input_layernorm.weight", torch.ones(hidden, dtype=dtype))
        writer.close()
        (tmp / "config.json").write_text(json.dumps(deci_config(config, blocks, qkv_bias, dtype), indent=1) + "\n")
        shutil.copy(Path(configuration_decilm.__file__), tmp / "configuration_decilm.py")
        for f in source.path.iterdir():
            if f.is_file() and TOKENIZER_FILES.fullmatch(f.name):
                shutil.copy(f, tmp / f.name)
    return {"path": str(out_dir), "blocks": len(blocks), "heads": [b.heads for b in blocks],
            "kv_heads": [b.kv_heads for b in blocks], "channels": [b.channels for b in blocks],
            "no_op_attention": [i for i, b in enumerate(blocks) if not b.heads],
            "no_op_ffn": [i for i, b in enumerate(blocks) if not b.channels],
            "zero_attention": [i for i, b in enumerate(blocks) if b.zero_attention],
            "dtype": str(dtype).removeprefix("torch."), "bytes": sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))}
