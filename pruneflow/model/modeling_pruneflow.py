"""Loader for pruned checkpoints whose layers have different widths (a non-uniform plan).

This file is copied next to such checkpoints so ``from_pretrained(dir, trust_remote_code=True)`` works
anywhere transformers does. It depends on torch and transformers only. Each class subclasses the stock
transformers class and, after the stock ``__init__``, resizes every block's projections to the widths in
``config.pruneflow_layers`` using the module paths in ``config.pruneflow_arch``. No modeling code is copied.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers import (BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM, conversion_mapping)


def set_head_counts(attn: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Update an attention module's cached head counts to the widths of its projections."""
    counts = {"num_heads": num_heads, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
              "num_key_value_groups": num_heads // max(1, num_kv_heads), "all_head_size": num_heads * head_dim}
    for name, value in counts.items():
        if hasattr(attn, name):
            setattr(attn, name, value)


def _replace(block: nn.Module, path: str, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    old = block.get_submodule(path)
    with warnings.catch_warnings():  # a removed sub-block's projections have no rows: nothing to initialise
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
        new = nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)
    parent, _, name = path.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, name, new)
    return new


def resize_experts(router: nn.Module, experts: nn.Module, count: int, new=None) -> None:
    """Give one MoE block ``count`` experts: every tensor with an expert axis first (the fused expert tensors,
    the router's weight and bias) becomes ``new(old)`` (default: uninitialised, the per-layer loader's shapes)
    and both modules' expert counts follow. The router's top-k is never above them (plans keep at least top-k)."""
    new = new or (lambda old: old.new_empty((count, *old.shape[1:])))
    for module, name in ((experts, "gate_up_proj"), (experts, "down_proj"), (router, "weight"), (router, "bias")):
        old = getattr(module, name, None)
        if old is not None:
            setattr(module, name, nn.Parameter(new(old), requires_grad=old.requires_grad))
    experts.num_experts = router.num_experts = count


def resize_expert_width(experts: nn.Module, width: int, gate_up=None, down=None) -> None:
    """Give every expert of one MoE block ``width`` channels: ``gate_up_proj`` (E, 2·width, D) becomes
    ``gate_up(old)`` and ``down_proj`` (E, D, width) ``down(old)`` (default: uninitialised, the per-layer
    loader's shapes)."""
    gate_up = gate_up or (lambda old: old.new_empty((old.shape[0], 2 * width, old.shape[2])))
    down = down or (lambda old: old.new_empty((*old.shape[:2], width)))
    for name, new in (("gate_up_proj", gate_up), ("down_proj", down)):
        old = getattr(experts, name)
        setattr(experts, name, nn.Parameter(new(old), requires_grad=old.requires_grad))
    experts.intermediate_dim = width


def resize_block(block: nn.Module, arch: dict, widths: dict, head_dim: int) -> None:
    """Give one block's projections the widths of ``widths`` (heads, kv_heads, channels, o/down bias; an MoE
    block: its expert count and every expert's channels)."""
    hidden = block.get_submodule(arch["q"]).in_features
    q_dim, kv_dim = widths["heads"] * head_dim, widths["kv_heads"] * head_dim
    for path, out_features in ((arch["q"], q_dim), (arch["k"], kv_dim), (arch["v"], kv_dim)):
        _replace(block, path, hidden, out_features, block.get_submodule(path).bias is not None)
    _replace(block, arch["o"], q_dim, hidden, widths["o_bias"])
    if arch.get("experts"):
        experts = block.get_submodule(arch["experts"])
        resize_experts(block.get_submodule(arch["router"]), experts, widths["experts"])
        if widths["channels"] != experts.down_proj.shape[2]:
            resize_expert_width(experts, widths["channels"])
    else:
        for path in (arch["gate"], arch["up"]):
            if path:
                _replace(block, path, hidden, widths["channels"], block.get_submodule(path).bias is not None)
        _replace(block, arch["down"], widths["channels"], hidden, widths["down_bias"])
    attention = block.get_submodule(arch["q"].rpartition(".")[0])
    set_head_counts(attention, widths["heads"], widths["kv_heads"], head_dim)
    if widths["heads"] == 0:  # a removed attention sub-block (pruneflow.units.subblocks)
        attention.forward = no_attention.__get__(attention)  # bound to this module only


def no_attention(self, hidden_states, *args, past_key_values=None, **kwargs):
    """The forward of an attention with no heads: it adds nothing to the residual stream. Its KV cache entry
    grows empty (no heads) so the cache still knows the sequence length, which later positions are read from."""
    if past_key_values is not None:
        empty = hidden_states.new_zeros((hidden_states.shape[0], 0, hidden_states.shape[1], self.head_dim))
        past_key_values.update(empty, empty, self.layer_idx)
    return torch.zeros_like(hidden_states), None


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _pruned(config_cls, model_cls, model_type: str):
    class PrunedConfig(config_cls):
        pass

    PrunedConfig.model_type = model_type

    class PrunedModel(model_cls):
        config_class = PrunedConfig

        def __init__(self, config):
            super().__init__(config)
            arch = config.pruneflow_arch
            for block, widths in zip(self.get_submodule(arch["layers"]), config.pruneflow_layers):
                resize_block(block, arch, widths, head_dim_of(config))

    base_type = config_cls.model_type
    conversions = conversion_mapping.get_checkpoint_conversion_mapping(base_type)
    if conversions is not None:  # e.g. MoE experts: per-expert tensors on disk, fused in memory, both ways
        conversion_mapping.register_checkpoint_conversion_mapping(model_type, conversions, overwrite=True)
    PrunedConfig.__name__ = PrunedConfig.__qualname__ = f"Pruned{config_cls.__name__}"
    PrunedModel.__name__ = PrunedModel.__qualname__ = f"Pruned{model_cls.__name__}"
    return PrunedConfig, PrunedModel


PrunedLlamaConfig, PrunedLlamaForCausalLM = _pruned(LlamaConfig, LlamaForCausalLM, "pruneflow_llama")
PrunedMistralConfig, PrunedMistralForCausalLM = _pruned(MistralConfig, MistralForCausalLM, "pruneflow_mistral")
PrunedQwen2Config, PrunedQwen2ForCausalLM = _pruned(Qwen2Config, Qwen2ForCausalLM, "pruneflow_qwen2")
PrunedQwen3Config, PrunedQwen3ForCausalLM = _pruned(Qwen3Config, Qwen3ForCausalLM, "pruneflow_qwen3")
PrunedQwen3MoeConfig, PrunedQwen3MoeForCausalLM = _pruned(Qwen3MoeConfig, Qwen3MoeForCausalLM, "pruneflow_qwen3_moe")
PrunedMixtralConfig, PrunedMixtralForCausalLM = _pruned(MixtralConfig, MixtralForCausalLM, "pruneflow_mixtral")
PrunedBertConfig, PrunedBertModel = _pruned(BertConfig, BertModel, "pruneflow_bert")

# model_type of the base model → (config class, model class, auto class key) for the auto_map
CLASSES = {
    "llama": (PrunedLlamaConfig, PrunedLlamaForCausalLM, "AutoModelForCausalLM"),
    "mistral": (PrunedMistralConfig, PrunedMistralForCausalLM, "AutoModelForCausalLM"),
    "qwen2": (PrunedQwen2Config, PrunedQwen2ForCausalLM, "AutoModelForCausalLM"),
    "qwen3": (PrunedQwen3Config, PrunedQwen3ForCausalLM, "AutoModelForCausalLM"),
    "qwen3_moe": (PrunedQwen3MoeConfig, PrunedQwen3MoeForCausalLM, "AutoModelForCausalLM"),
    "mixtral": (PrunedMixtralConfig, PrunedMixtralForCausalLM, "AutoModelForCausalLM"),
    "bert": (PrunedBertConfig, PrunedBertModel, "AutoModel"),
}
