"""Export a checkpoint for serving engines: GGUF, the format llama.cpp (and llama-cpp-python, Ollama, LM
Studio) loads, and ONNX (ONNX Runtime; :func:`export_onnx`, at the end).

A checkpoint whose blocks all have the same widths is written as its family's own llama.cpp architecture
(``llama`` for Llama and Mistral, ``qwen2``, ``qwen3``; Mixture of Experts: ``qwen3moe``, and ``llama`` with
experts for Mixtral — the router as ``ffn_gate_inp``, each projection stacked over the experts as
``ffn_{gate,up,down}_exps``, one expert count for every layer); per-layer widths — any non-uniform plan — as
``deci``, the architecture llama.cpp added for Nemotron-NAS, whose head counts and FFN widths are per-layer
arrays. The weights are read one tensor at a time from the safetensors files (never the whole model) and
written to a temporary file renamed into place at the end, so a failed export leaves nothing behind.

What llama.cpp cannot express fails before anything is written, naming it: a qwen3 model with per-layer
widths or a FLAP bias (``deci`` has no q/k norms, ``qwen3`` no o_proj/down_proj bias), activations other than
SiLU, RoPE scalings other than linear and llama3. See README, "Serving a pruned model".

Layout facts (llama.cpp's loaders, ``src/models/{llama,deci,qwen2,qwen3}.cpp``): ``llama`` and ``deci`` apply
RoPE to interleaved pairs, so the q and k rows of each head are permuted from the Hugging Face (half-split)
order, per layer with that layer's head counts; ``qwen2``/``qwen3`` use the half-split order as it is.
A block whose attention or MLP was removed (the sub-block unit: no heads, or no channels) goes as ``deci`` with
``n_head = 0`` (attention-free: no attention tensors, no attention norm) or ``n_ff = 0`` (FFN-free). llama.cpp's
``deci`` graph drops the whole block when ``n_ff = 0`` — the attention output too: it ``continue``s before the
block's result becomes the next input — so a block that keeps its attention but lost its MLP is written with one
zero MLP channel (``n_ff = 1``, zero gate/up/down rows: it adds exactly 0). llama.cpp also reads the head size
from block 0's head count, so an attention-free block 0 is written with one zero head (``n_head = 1``, zero
q/k/v/o: it adds exactly 0).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pruneflow.model import arch as A
from pruneflow.model import mlp
from pruneflow.errors import PruneflowError
from pruneflow.model.sources import ModelSource, resolve
from pruneflow.model import checkpoint as C
from pruneflow.model import quantize as Q
from pruneflow.execution.streaming import LazyWeights
from pruneflow.atomic import atomic_dir, check_output_dir, check_output_file
from pruneflow.execution.runtime import Runtime

log = logging.getLogger(__name__)

GGUF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")
MOE_ARCHS = {"qwen3_moe": "qwen3moe", "mixtral": "llama"}  # llama.cpp runs Mixtral as llama with experts
# an MoE block's tensors as transformers saves them (its checkpoint format: one set per expert): (router, expert
# prefix, expert projection → the GGUF tensor stacking it over experts)
EXPERT_NAMES = {
    "qwen3_moe": ("mlp.gate", "mlp.experts", {"gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight",
                                              "down_proj": "ffn_down_exps.weight"}),
    "mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts",
                {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}),
}

# Hugging Face names → GGUF names (llama.cpp's tensor names, gguf.constants.TENSOR_NAMES)
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.down_proj.bias": "ffn_down.bias",
}

# pre-tokenizer split patterns of byte-level BPE tokenizers → llama.cpp's name for that pre-tokenizer
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "qwen2",
}


@dataclass
class Block:
    """One block as llama.cpp will see it."""
    heads: int
    kv_heads: int
    channels: int  # MoE: one expert's width
    experts: int = 0  # MoE: its expert count

    zero_attention: bool = False  # an attention-free block 0: written with one zero head (module docstring)

    @property
    def n_head(self) -> int:  # n_head and n_head_kv as llama.cpp gets them
        return 1 if self.zero_attention else self.heads

    @property
    def n_head_kv(self) -> int:
        return 1 if self.zero_attention else self.kv_heads

    @property
    def zero_ffn(self) -> bool:
        """Attention kept, MLP removed: written with one zero channel (see the module docstring)."""
        return self.heads > 0 and self.channels == 0

    @property
    def ffn(self) -> int:  # n_ff as llama.cpp gets it
        return 1 if self.zero_ffn else self.channels


@dataclass
class Layout:
    """What the GGUF file will hold: its architecture, per-block widths and the hyper-parameters it needs."""
    arch: str
    family: str
    blocks: list[Block]
    head_dim: int
    hidden: int
    vocab: int
    tied: bool
    permute: bool  # q/k rows into llama.cpp's interleaved RoPE order
    rope: dict = field(default_factory=dict)
    top_k: int = 0  # MoE: experts used per token

    @property
    def per_layer(self) -> bool:
        return self.arch == "deci"


def _rope(config: dict) -> dict:
    """RoPE parameters from a transformers 5 (``rope_parameters``) or older (``rope_theta``/``rope_scaling``)
    config: theta, type and the scaling's own fields."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "linear", "llama3"):
        raise PruneflowError(f"RoPE scaling {kind!r} has no GGUF export here (supported: none, linear, llama3)")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise PruneflowError("a partial rotary factor has no place in llama.cpp's llama/deci/qwen architectures")
    return {**params, "rope_type": kind}


def llama3_rope_factors(rope: dict, head_dim: int) -> torch.Tensor:
    """The per-frequency divisors of Llama 3.1's RoPE scaling (llama.cpp's ``rope_freqs`` tensor): 1 for high
    frequencies, ``factor`` for low ones, a smooth blend between (the scaling as published with Llama 3.1)."""
    theta, factor = rope["rope_theta"], rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelen < context / high, torch.ones_like(freqs),
                          torch.where(wavelen > context / low, torch.full_like(freqs, factor), blended))
    return factors.to(torch.float32)


def check_family(config: dict) -> str:
    """What llama.cpp cannot hold whatever the plan (the model type, its activation, its RoPE): an error naming
    it. Returns the family. Cheap (the config only), so a pipeline that exports checks it before any work."""
    family = A.base_model_type(config.get("model_type", ""))
    if family not in FAMILIES:
        raise PruneflowError(f"model type {family or '?'!r} has no GGUF export (supported: {', '.join(FAMILIES)})")
    if config.get("hidden_act", "silu") != "silu":
        raise PruneflowError(f"activation {config['hidden_act']!r}: llama.cpp's llama/deci/qwen blocks use SiLU")
    _rope(config)
    return family


def check_plan(config: dict, per_layer: bool, output_bias: bool) -> None:
    """Before pruning: whether the checkpoint a plan will give can be written as GGUF. ``per_layer``: blocks
    may end up with different widths (a global or searched allocation); ``output_bias``: FLAP's bias on
    o_proj/down_proj (``reconstruct: bias``). The same rules :func:`plan_layout` applies to the weights."""
    family = check_family(config)
    if family in MOE_ARCHS:
        if per_layer:
            raise PruneflowError("llama.cpp holds one expert count and one expert width for every layer: prune an "
                                 "MoE model with allocation: uniform to export it to GGUF")
        if family == "qwen3_moe" and not config.get("norm_topk_prob", False):
            raise PruneflowError("llama.cpp's qwen3moe renormalises the top-k routing weights; this config has "
                                 "norm_topk_prob: false")
        return
    if family != "qwen3":
        return
    if per_layer:
        raise PruneflowError("a qwen3 model with per-layer widths is not representable in GGUF: llama.cpp's "
                             "per-layer architecture (deci) has no q/k norms; prune with allocation: uniform")
    if output_bias:
        raise PruneflowError("llama.cpp's qwen3 has no o_proj/down_proj bias (FLAP's reconstruct: bias): prune "
                             "with reconstruct: none or lstsq to export to GGUF")


def plan_layout(config: dict, weights) -> Layout:
    """Check that llama.cpp can hold this checkpoint and how: the architecture, per-block widths (read from the
    weights' shapes, so vanilla and per-layer checkpoints alike) and which blocks need a zero pad."""
    family = check_family(config)
    names = weights.tensors
    moe = family in MOE_ARCHS
    block_names = r"model\.layers\.\d+\.(" + "|".join(map(re.escape, BLOCK_NAMES)) + ")"
    if moe:
        router, experts, projections = EXPERT_NAMES[family]
        expert_names = (rf"model\.layers\.\d+\.({re.escape(router)}\.weight|{re.escape(experts)}\.\d+\."
                        rf"({'|'.join(projections)})\.weight)")
    unknown = [n for n in names if n not in GLOBAL_NAMES and not re.fullmatch(block_names, n)
               and not (moe and re.fullmatch(expert_names, n))]
    if unknown:
        raise PruneflowError(f"tensor(s) {', '.join(unknown[:3])} have no place in a GGUF {family} model")
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        if name not in names:
            raise PruneflowError(f"checkpoint {weights.path} lacks {name} (truncated or not a causal LM?)")
    head_dim = A.head_dim_in(config)
    count = 1 + max((int(n.split(".")[2]) for n in names if n.startswith("model.layers.")), default=-1)

    def width(i: int, proj: str, per: int) -> int:
        name = f"model.layers.{i}.{proj}.weight"
        return names[name].shape[0] // per if name in names else 0

    blocks, biases = [], []
    for i in range(count):
        gate = next(iter(EXPERT_NAMES[family][2])) if moe else ""  # an expert's gate projection: its width
        experts = sum(bool(re.fullmatch(rf"model\.layers\.{i}\.{re.escape(EXPERT_NAMES[family][1])}\.\d+\."
                                        rf"{gate}\.weight", n)) for n in names) if moe else 0
        block = Block(width(i, "self_attn.q_proj", head_dim), width(i, "self_attn.k_proj", head_dim),
                      width(i, f"{EXPERT_NAMES[family][1]}.0.{gate}" if moe else "mlp.up_proj", 1), experts)
        if moe and not experts:
            raise PruneflowError(f"block {i} has a dense MLP: llama.cpp's {MOE_ARCHS[family]} needs every block "
                                 f"to be a Mixture of Experts")
        if moe and (not block.heads or not block.channels):
            raise PruneflowError(f"block {i} has no attention heads or no MLP channels: not a checkpoint "
                                 f"pruneflow or transformers writes")
        if bool(block.heads) != bool(block.kv_heads) or (block.kv_heads and block.heads % block.kv_heads):
            raise PruneflowError(f"block {i}: {block.heads} query heads over {block.kv_heads} KV heads; llama.cpp "
                                 f"needs a whole number of query heads per KV head")
        has = {key for key in BLOCK_NAMES if f"model.layers.{i}.{key}" in names}
        biases.append(has)
        blocks.append(block)
    if blocks and not blocks[0].heads:
        blocks[0] = replace(blocks[0], zero_attention=True)
    uniform = len({(b.heads, b.kv_heads, b.channels, b.experts) for b in blocks}) == 1 and \
        all(b.heads and b.channels for b in blocks)  # a removed sub-block needs deci's per-layer forms
    out_bias = any({"self_attn.o_proj.bias", "mlp.down_proj.bias"} & has for has in biases)
    if moe:
        check_plan(config, per_layer=not uniform, output_bias=out_bias)
        arch = MOE_ARCHS[family]
    elif family == "qwen3":
        check_plan(config, per_layer=not uniform, output_bias=out_bias)
        arch = "qwen3"
    elif family == "qwen2" and uniform and not out_bias and blocks[0].heads * head_dim == config["hidden_size"]:
        arch = "qwen2"  # its loader needs q = hidden and has no output biases; anything else goes as deci
    else:
        arch = "llama" if uniform and family != "qwen2" else "deci"
    if config.get("sliding_window") and config.get("use_sliding_window", True) and family == "mistral":
        log.warning("sliding_window %s is not written: llama.cpp's llama architecture attends to the whole "
                    "context (exact up to that many tokens)", config["sliding_window"])
    embed = names["model.embed_tokens.weight"].shape
    tied = "lm_head.weight" not in names
    if not tied and names["lm_head.weight"].shape != embed:
        raise PruneflowError(f"lm_head {names['lm_head.weight'].shape} does not match the embedding {embed}")
    return Layout(arch=arch, family=family, blocks=blocks, head_dim=head_dim, hidden=config["hidden_size"],
                  vocab=embed[0], tied=tied, permute=arch in ("llama", "deci"), rope=_rope(config),
                  top_k=config.get("num_experts_per_tok", 0) if moe else 0)


def rope_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q or k (or their bias) from the half-split RoPE order of Hugging Face to the interleaved order
    llama.cpp's ``llama``/``deci`` rotate: per head, row ``j`` of the first half goes to ``2j``, of the second
    to ``2j + 1`` (the permutation llama.cpp's own converter applies)."""
    if heads == 0:
        return weight
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@dataclass
class GgufTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]


def _tensors(layout: Layout, weights, dtype: torch.dtype) -> list[GgufTensor]:
    """Every tensor of the GGUF file, in order, each with a reader that produces it from the checkpoint."""
    def plain(name: str, out_dtype: torch.dtype, transform=None) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            tensor = weights.read([name], torch.float32, torch.device("cpu"))[name]
            return (transform(tensor) if transform else tensor).to(out_dtype).contiguous()
        return read

    def stacked(parts: list[str], out_dtype: torch.dtype) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:  # one expert at a time into the (experts, out, in) tensor
            first = weights.read(parts[:1], torch.float32, torch.device("cpu"))[parts[0]]
            out = torch.empty((len(parts), *first.shape), dtype=out_dtype)
            out[0] = first
            for e, name in enumerate(parts[1:], 1):
                out[e] = weights.read([name], torch.float32, torch.device("cpu"))[name]
            return out
        return read

    def kind(name: str) -> torch.dtype:  # norms, biases and other 1-D tensors stay f32, as llama.cpp expects
        return torch.float32 if len(weights.tensors[name].shape) == 1 else dtype

    names = weights.tensors
    out = [GgufTensor("token_embd.weight", tuple(names["model.embed_tokens.weight"].shape), dtype,
                      plain("model.embed_tokens.weight", dtype))]
    if layout.rope["rope_type"] == "llama3":
        factors = llama3_rope_factors(layout.rope, layout.head_dim)
        out.append(GgufTensor("rope_freqs.weight", tuple(factors.shape), torch.float32, lambda: factors))
    for i, block in enumerate(layout.blocks):
        prefix = f"model.layers.{i}."
        heads = {"self_attn.q_proj": block.heads, "self_attn.k_proj": block.kv_heads}
        if block.zero_attention:
            hidden, head = layout.hidden, layout.head_dim
            zero = {"attn_norm.weight": (hidden,), "attn_q.weight": (head, hidden), "attn_k.weight": (head, hidden),
                    "attn_v.weight": (head, hidden), "attn_output.weight": (hidden, head)}
            for gguf_name, shape in zero.items():
                kind_of = torch.float32 if len(shape) == 1 else dtype
                out.append(GgufTensor(f"blk.{i}.{gguf_name}", shape, kind_of,
                                      lambda sh=shape, k=kind_of: torch.zeros(sh, dtype=k)))
        for key in BLOCK_NAMES:
            name = prefix + key
            removed = (not block.heads and (key.startswith("self_attn.") or key == "input_layernorm.weight")) or \
                (not block.channels and (key.startswith("mlp.") or key == "post_attention_layernorm.weight")
                 and not block.zero_ffn)
            if name not in names or removed:
                continue
            if block.zero_ffn and key.startswith("mlp.") and key.endswith(".weight"):
                rows, cols = (layout.hidden, 1) if key.startswith("mlp.down_proj") else (1, layout.hidden)
                out.append(GgufTensor(f"blk.{i}.{BLOCK_NAMES[key]}", (rows, cols), dtype,
                                      lambda r=rows, c=cols: torch.zeros(r, c, dtype=dtype)))
                continue
            if block.zero_ffn and key in ("mlp.gate_proj.bias", "mlp.up_proj.bias"):
                out.append(GgufTensor(f"blk.{i}.{BLOCK_NAMES[key]}", (1,), torch.float32,
                                      lambda: torch.zeros(1, dtype=torch.float32)))
                continue
            proj = key.rpartition(".")[0]
            transform = None
            if layout.permute and proj in heads:
                transform = lambda t, h=heads[proj]: rope_permute(t, h)  # noqa: E731
            out.append(GgufTensor(f"blk.{i}.{BLOCK_NAMES[key]}", tuple(names[name].shape), kind(name),
                                  plain(name, kind(name), transform)))
        if block.experts:
            router_path, experts_path, projections = EXPERT_NAMES[layout.family]
            router = f"{prefix}{router_path}.weight"
            out.append(GgufTensor(f"blk.{i}.ffn_gate_inp.weight", tuple(names[router].shape), torch.float32,
                                  plain(router, torch.float32)))
            for proj, gguf_name in projections.items():
                parts = [f"{prefix}{experts_path}.{e}.{proj}.weight" for e in range(block.experts)]
                out.append(GgufTensor(f"blk.{i}.{gguf_name}", (block.experts, *names[parts[0]].shape), dtype,
                                      stacked(parts, dtype)))
    out.append(GgufTensor("output_norm.weight", tuple(names["model.norm.weight"].shape), torch.float32,
                          plain("model.norm.weight", torch.float32)))
    if not layout.tied:
        out.append(GgufTensor("output.weight", tuple(names["lm_head.weight"].shape), dtype,
                              plain("lm_head.weight", dtype)))
    return out


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: its raw 16 bits
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def _add_vocab(writer, path: Path, vocab_rows: int) -> dict:
    """The tokenizer: byte-level BPE as llama.cpp's ``gpt2`` model (tokens + merges), SentencePiece-style BPE
    (Llama 2, Mistral) as its ``llama`` model (tokens, scores, types); special tokens, merges and the chat
    template through ``gguf.SpecialVocab``. Rows of a padded embedding beyond the tokenizer get ``[PADn]``."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab

    file = path / "tokenizer.json"
    if not file.exists():
        raise PruneflowError(f"{path} has no tokenizer.json: the GGUF file needs the tokenizer (save it with the "
                             f"model, or copy it from the model the checkpoint was pruned from)")
    spec = json.loads(file.read_text())
    pre = "default"
    try:
        vocab = BpeVocab(path)
        pre = _pre_tokenizer(spec)
    except FileNotFoundError:
        try:
            vocab = LlamaHfVocab(path)
        except (FileNotFoundError, TypeError) as err:
            raise PruneflowError(f"tokenizer of type {spec['model'].get('type')!r} in {file}: only byte-level "
                                 f"BPE and SentencePiece-style BPE tokenizers are exported ({err})") from err
    tokens, scores, types = [], [], []
    for text, score, token_type in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(token_type)
    specials = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    for i in range(len(types)):  # added special tokens are CONTROL, the other added ones USER_DEFINED
        if i >= vocab.vocab_size_base and i not in specials:
            types[i] = gguf.TokenType.USER_DEFINED
    if len(tokens) > vocab_rows:
        raise PruneflowError(f"the tokenizer has {len(tokens)} tokens but the embedding only {vocab_rows} rows")
    for i in range(len(tokens), vocab_rows):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(path, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    return {"model": vocab.tokenizer_model, "pre": pre, "tokens": len(tokens)}


def _pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer; ``default`` (with a warning: text is
    then split differently from transformers, token ids fed directly are unaffected) when it is not known."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    for step in pre.get("pretokenizers", []):
        pattern = (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split" else None
        if pattern in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[pattern]
    log.warning("pre-tokenizer not recognised: written as llama.cpp's 'default' (its text splitting may differ)")
    return "default"


def export_gguf(checkpoint: str | Path | ModelSource, out: Path, dtype: str = "auto",
                overwrite: bool = False, quantize: str | None = None) -> dict:
    """Write ``checkpoint`` (a directory or hub id; pruneflow's or plain transformers) as one GGUF file.

    ``dtype``: ``auto`` (the checkpoint's: bf16 stays bf16, f16 f16, anything else f32), ``f32``, ``f16`` or
    ``bf16`` for the matrices; norms and biases are always f32. ``quantize`` (one of ``quantize.QUANT_TYPES``):
    the file in ``dtype`` is then quantized by llama.cpp's quantizer into ``out`` (:func:`quantize.quantize_gguf`:
    its summary, with the fallbacks, under ``"quantize"``). Returns a summary (architecture, widths, tensors,
    bytes). Every check runs before the output file is opened.
    """
    import gguf

    if quantize is not None:
        quantize = Q.check_type(quantize)
        Q.llama_cpp_module()
    out = Path(out)
    check_output_file(out, overwrite)
    source = checkpoint if isinstance(checkpoint, ModelSource) else resolve(checkpoint)
    config = C.read_config(source)
    weights = LazyWeights(source.path)
    layout = plan_layout(config, weights)
    if dtype == "auto":
        stored = C.stored_dtype(source)
        target = stored if stored in (torch.bfloat16, torch.float16) else torch.float32
    elif dtype in GGUF_DTYPES:
        target = GGUF_DTYPES[dtype]
    else:
        raise PruneflowError(f"GGUF dtype {dtype!r}: choose auto, {', '.join(GGUF_DTYPES)}")
    tensors = _tensors(layout, weights, target)
    file_type = {torch.float32: gguf.LlamaFileType.ALL_F32, torch.float16: gguf.LlamaFileType.MOSTLY_F16,
                 torch.bfloat16: gguf.LlamaFileType.MOSTLY_BF16}[target]
    raw = {torch.float32: None, torch.float16: None, torch.bfloat16: gguf.GGMLQuantizationType.BF16}
    numpy_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, layout.arch)
    try:
        _add_hparams(writer, layout, config, source, file_type)
        vocab = _add_vocab(writer, source.path, layout.vocab)
        sizes = [math.prod(t.shape) * t.dtype.itemsize for t in tensors]
        for t, nbytes in zip(tensors, sizes):
            writer.add_tensor_info(t.name, t.shape, np.dtype(numpy_dtype[t.dtype]), nbytes, raw_dtype=raw[t.dtype])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=sum(sizes), desc=f"writing {out.name}", unit="B", unit_scale=True, leave=False) as bar:
            for t, nbytes in zip(tensors, sizes):
                data = t.read()
                if tuple(data.shape) != t.shape:
                    raise PruneflowError(f"tensor {t.name}: read {tuple(data.shape)}, expected {t.shape}")
                writer.write_tensor_data(_numpy(data))
                bar.update(nbytes)
        writer.close()
        quantized = Q.quantize_gguf(tmp, out, quantize, overwrite=overwrite) if quantize else None
        if not quantize:
            os.replace(tmp, out)
    except BaseException as err:
        writer.close()
        if isinstance(err, OSError):
            raise PruneflowError(f"writing {out} failed ({err.strerror or err}); nothing was written") from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
    blocks = layout.blocks
    return {"path": str(out), "architecture": layout.arch, "dtype": str(target).removeprefix("torch."),
            "blocks": len(blocks), "heads": [b.heads for b in blocks], "kv_heads": [b.kv_heads for b in blocks],
            "channels": [b.channels for b in blocks], "tied": layout.tied, "tensors": len(tensors),
            "tokenizer": vocab, "bytes": out.stat().st_size, **({"quantize": quantized} if quantized else {})}


def _add_hparams(writer, layout: Layout, config: dict, source: ModelSource, file_type) -> None:
    import gguf

    def per_block(values: list[int]) -> int | list[int]:
        return values if layout.per_layer else values[0]

    blocks = layout.blocks
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(source.name).name or source.name)
    writer.add_description(f"exported by pruneflow from {source.pinned}")
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(layout.hidden)
    writer.add_block_count(len(blocks))
    writer.add_feed_forward_length(per_block([b.ffn for b in blocks]))
    writer.add_head_count(per_block([b.n_head for b in blocks]))
    writer.add_head_count_kv(per_block([b.n_head_kv for b in blocks]))
    writer.add_key_length(layout.head_dim)  # else llama.cpp derives head size from block 0 as hidden / heads
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(layout.head_dim)
    writer.add_rope_freq_base(float(layout.rope["rope_theta"]))
    if layout.rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(layout.rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(layout.vocab)
    if blocks[0].experts:
        writer.add_expert_count(blocks[0].experts)
        writer.add_expert_used_count(layout.top_k)
        writer.add_expert_feed_forward_length(blocks[0].channels)
    writer.add_file_type(file_type)


ONNX_TOLERANCE = 1e-3  # largest |logit| difference to torch on the check batch before an export is refused


class _Forward(torch.nn.Module):
    """What the ONNX graph computes: (input_ids, attention_mask) → logits (causal LMs, no KV cache) or the last
    hidden states (encoders)."""

    def __init__(self, model, causal_lm: bool):
        super().__init__()
        self.model, self.causal_lm = model, causal_lm

    def forward(self, input_ids, attention_mask):
        if self.causal_lm:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def check_onnx(config: dict) -> None:
    """What the ONNX export cannot trace, from the config alone (the pipeline checks it before any work)."""
    if not mlp.of(A.arch_for(config.get("model_type", ""))).traceable:
        raise PruneflowError("ONNX export of Mixture-of-Experts models is not supported: torch.onnx cannot trace "
                             "transformers' fused experts (grouped_mm)")


def export_onnx(checkpoint: str | Path | ModelSource, out_dir: Path, overwrite: bool = False) -> dict:
    """Write ``checkpoint`` (per-layer widths, FLAP biases and removed blocks included) as an ONNX model in
    ``out_dir``: ``model.onnx`` (+ its external weights file), the tokenizer and ``export.json``.

    The graph is float32, dynamic in batch and sequence length, without a KV cache: causal LMs give
    ``logits``, encoders ``last_hidden_state``. Before the directory is renamed into place the exported model is
    run in ONNX Runtime on a padded batch and compared with torch; above ``ONNX_TOLERANCE`` it is an error.
    """
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as err:
        raise PruneflowError(f"ONNX export needs onnx, onnxscript and onnxruntime: pip install 'pruneflow[onnx]' "
                             f"({err})") from None

    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    source = checkpoint if isinstance(checkpoint, ModelSource) else resolve(checkpoint)
    check_onnx(C.read_config(source))
    model, tokenizer, spec = C.load(source, Runtime.create("cpu", "float32"))
    forward = _Forward(model, spec.causal_lm).eval()
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(1, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row: the mask input is live in the graph
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("sequence", min=2, max=1 << 17)
    output = "logits" if spec.causal_lm else "last_hidden_state"
    with atomic_dir(out_dir, overwrite) as tmp, torch.no_grad():
        program = torch.onnx.export(forward, (ids, mask), tmp / "model.onnx", dynamo=True, external_data=True,
                                    input_names=["input_ids", "attention_mask"], output_names=[output],
                                    dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                    "attention_mask": {0: batch, 1: seq}})
        if program is None:
            raise PruneflowError("torch.onnx.export produced no program")
        session = onnxruntime.InferenceSession(str(tmp / "model.onnx"), providers=["CPUExecutionProvider"])
        check_ids, check_mask = ids[:, :17], mask[:, :17]  # another length than the traced one
        got = session.run(None, {"input_ids": check_ids.numpy(), "attention_mask": check_mask.numpy()})[0]
        want = forward(check_ids, check_mask).numpy()
        valid = check_mask.numpy().astype(bool)
        diff = float(np.abs(got - want)[valid].max())
        if not diff <= ONNX_TOLERANCE:
            raise PruneflowError(f"the exported ONNX model differs from torch by {diff:.2e} (> {ONNX_TOLERANCE}); "
                                 f"nothing was written")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        info = {"source": source.pinned, "inputs": ["input_ids", "attention_mask"], "output": output,
                "dtype": "float32", "kv_cache": False, "onnxruntime_max_diff": diff,
                "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
        # the source's config goes in here, not as config.json: a per-layer one names remote code (auto_map)
        # that AutoTokenizer.from_pretrained(OUT_DIR) would then offer to run
        (tmp / "export.json").write_text(json.dumps({**info, "config": C.read_config(source)}, indent=1) + "\n")
    return {"path": str(out_dir), **info, "bytes": sum(p.stat().st_size for p in out_dir.iterdir())}
