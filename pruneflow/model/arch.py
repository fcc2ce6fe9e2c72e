"""Architectures as data: where each prunable projection lives, keyed by ``config.model_type``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from pruneflow.errors import PruneflowError
from pruneflow.model.modeling_pruneflow import head_dim_of

PRUNED_PREFIX = "pruneflow_"


@dataclass(frozen=True)
class ArchSpec:
    """Module paths, relative to the model root (``layers``) or to one block (the rest)."""

    layers: str
    q: str
    k: str
    v: str
    o: str
    up: str | None  # None where the MLP is a Mixture of Experts (``experts``)
    down: str | None
    gate: str | None = None  # None for a plain 2-layer MLP (BERT)
    causal_lm: bool = True  # loaded with AutoModelForCausalLM, else AutoModel
    norms: tuple[str, ...] = ()  # a block's norms over the hidden dimension (their outputs feed attention, MLP)
    final_norm: str | None = None  # the norm after the last block; with ``norms``: the hidden unit is supported
    # Mixture of Experts (the experts unit, pruneflow.units.experts): the router (a ``weight`` of (E, D), ``top_k``,
    # ``num_experts``) and the fused experts (``gate_up_proj`` (E, 2I, D), ``down_proj`` (E, D, I), ``num_experts``)
    router: str | None = None
    experts: str | None = None

    @property
    def moe(self) -> bool:
        return self.experts is not None

    def to_dict(self) -> dict:
        return asdict(self)


LLAMA = ArchSpec(layers="model.layers", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                 o="self_attn.o_proj", gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
                 norms=("input_layernorm", "post_attention_layernorm"), final_norm="model.norm")
BERT = ArchSpec(layers="encoder.layer", q="attention.self.query", k="attention.self.key",
                v="attention.self.value", o="attention.output.dense", up="intermediate.dense",
                down="output.dense", causal_lm=False)

# transformers 5's sparse MoE blocks (Qwen3-MoE, Mixtral, OLMoE): the same attention and norms, the MLP a router
# plus fused experts
MOE = replace(LLAMA, gate=None, up=None, down=None, router="mlp.gate", experts="mlp.experts")

# qwen2 adds q/k/v biases and qwen3 per-head q/k RMSNorms of size head_dim: both are sliced (biases) or
# shared across heads (norms) by the same rules, so they reuse the Llama layout.
ARCHS: dict[str, ArchSpec] = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "bert": BERT,
                             "qwen3_moe": MOE, "mixtral": MOE}
EXPERT_KEYS = ("num_experts", "num_local_experts")  # where configs keep the expert count (one aliases the other)
# transformers runs fused experts with grouped_mm, which needs every weight stride a multiple of 16 bytes: the
# widths of an expert tensor (its channels, the hidden size) are kept multiples of 8 values (bf16; fp32's 4 divides)
GROUPED_MM_ALIGN = 8


def expert_width_key(config: dict) -> str:
    """Where an MoE config (as a dict) keeps an expert's width: Qwen3-MoE's ``moe_intermediate_size`` (its
    ``intermediate_size`` is for dense MLP blocks), Mixtral's ``intermediate_size``."""
    return "moe_intermediate_size" if "moe_intermediate_size" in config else "intermediate_size"


def base_model_type(model_type: str) -> str:
    return model_type.removeprefix(PRUNED_PREFIX)


def arch_for(model_type: str) -> ArchSpec:
    """The ArchSpec for a ``config.model_type``, or a clear error listing what is supported."""
    model_type = base_model_type(model_type or "")
    if model_type not in ARCHS:
        written = " (pruneflow writes it for vLLM, `pruneflow export vllm`: use the checkpoint it came from)" \
            if model_type == "nemotron-nas" else ""
        raise PruneflowError(f"unsupported model type {model_type!r}{written}; supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[model_type]


@dataclass(frozen=True)
class Geometry:
    """Attention geometry shared by every layer of a model family."""

    hidden: int
    head_dim: int
    num_heads: int  # query heads of the unpruned config
    num_kv_heads: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def head_dim_in(config: dict) -> int:
    """The head size a config.json (as a dict) gives: its ``head_dim``, else hidden size / query heads."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def geometry(config) -> Geometry:
    num_heads = config.num_attention_heads
    head_dim = head_dim_of(config)
    num_kv = getattr(config, "num_key_value_heads", None) or num_heads
    return Geometry(hidden=config.hidden_size, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv)


def get(module: nn.Module, path: str) -> nn.Module:
    return module.get_submodule(path)


def blocks(model: nn.Module, arch: ArchSpec) -> nn.ModuleList:
    return get(model, arch.layers)


def set_blocks(model: nn.Module, arch: ArchSpec, blocks: nn.ModuleList) -> nn.ModuleList:
    """Make ``blocks`` the model's block list; returns the list it replaces."""
    parent, _, name = arch.layers.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, name)
    setattr(owner, name, blocks)
    return old


def layer_widths(model: nn.Module, arch: ArchSpec) -> list[dict]:
    """Per layer: query heads, KV heads, MLP channels (of one expert, in an MoE block), experts (MoE only) and
    whether o/down carry a bias."""
    geo = geometry(model.config)
    widths = []
    for block in blocks(model, arch):
        width = {"heads": get(block, arch.q).out_features // geo.head_dim,
                 "kv_heads": get(block, arch.k).out_features // geo.head_dim}
        if arch.moe:
            experts = get(block, arch.experts)
            width |= {"channels": experts.down_proj.shape[2], "experts": experts.down_proj.shape[0]}
        else:
            width["channels"] = get(block, arch.up).out_features
        width |= {"o_bias": get(block, arch.o).bias is not None,
                  "down_bias": not arch.moe and get(block, arch.down).bias is not None}
        widths.append(width)
    return widths


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total and non-embedding parameters (embeddings, position embeddings and an untied LM head excluded)."""
    seen: set[int] = set()
    total = embedding = 0
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    if output is not None:
        embedding_ids |= {id(p) for p in output.parameters()}
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if id(p) in embedding_ids:
            embedding += p.numel()
    return {"total": total, "non_embedding": total - embedding}


def head_rows(heads: list[int] | torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row (or column) indices of whole heads in a fused projection."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
