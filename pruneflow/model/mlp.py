"""The MLP of a block as a strategy: dense (gate/up/down Linears) or fused experts (transformers 5 keeps every
expert of an MoE block in 3-D ``gate_up_proj`` (E, 2I, D) / ``down_proj`` (E, D, I) tensors).

Generic code asks :func:`of` ``(spec)`` and never branches on MoE itself: statistics (``scores``, the
``magnitude`` method) what the MLP's down_proj sees, a channel importance and channel magnitudes — a dense
block's answers are (I,) per channel, a fused-experts block's (E, I), every expert's own channels; the hidden
unit which MLP tensors read and write the residual stream beyond the spec's Linears, and what the hidden size
must stay a multiple of (``align``); recovery which LoRA targets are parameters rather than modules; a vanilla
config where an MLP's width goes (``write_width``); the ONNX export whether it can trace the MLP.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pruneflow.model import arch as A
from pruneflow.model.arch import ArchSpec
from pruneflow.execution.stats import InputStats


class Dense:
    """gate/up/down Linear layers: one set of channels per block."""

    compensates = True  # a down_proj bias can take FLAP's compensation
    linear_down = True  # down_proj is a Linear whose input every token of the block reaches
    align = 1  # what the hidden size must stay a multiple of, for the MLP's kernels
    traceable = True  # torch.onnx can trace it
    fused_keys: tuple[str, ...] = ()  # ArchSpec keys whose weights are parameters of a fused module, not Linears

    def stream_tensors(self, block: nn.Module, spec: ArchSpec) -> list[tuple[nn.Module, str, int]]:
        """(module, parameter, dimension) of the MLP's tensors on the residual stream that the spec's Linear
        readers and writers do not cover: none."""
        return []

    def lora_parameters(self, spec: ArchSpec, targets: list[str]) -> list[str]:
        """peft ``target_parameters`` for these LoRA targets: none (every target is a Linear module)."""
        return []

    def write_width(self, config: dict, width: dict) -> None:
        """Put a layer's MLP width (``width``: one of ``arch.layer_widths``) into a stock config dict."""
        config["intermediate_size"] = width["channels"]

    def record(self, block: nn.Module, spec: ArchSpec, dtype: torch.dtype, into: list) -> object:
        """Append one ``InputStats`` of down_proj's input to ``into`` and watch it; returns the hook handle."""
        stats = InputStats()
        into.append(stats)

        def hook(_module, args):
            stats.add(args[0].detach().reshape(-1, args[0].shape[-1]), dtype)  # (tokens, I)

        return block.get_submodule(spec.down).register_forward_pre_hook(hook)

    def importance(self, block: nn.Module, spec: ArchSpec, stats: InputStats,
                   fn: Callable[[torch.Tensor, InputStats], torch.Tensor]) -> torch.Tensor:
        """(I,): ``fn(down_proj weight (D, I), stats of its input)``."""
        return fn(block.get_submodule(spec.down).weight, stats)

    def magnitude(self, block: nn.Module, spec: ArchSpec) -> torch.Tensor:
        """(I,): the L2 norm of every channel's gate and up rows and down column."""
        square = (block.get_submodule(spec.up).weight.float().pow(2).sum(1)
                  + block.get_submodule(spec.down).weight.float().pow(2).sum(0))
        if spec.gate:
            square = square + block.get_submodule(spec.gate).weight.float().pow(2).sum(1)
        return square.sqrt()


class FusedExperts:
    """Fused expert tensors: every expert has its own channels, seen only by the tokens routed to it."""

    compensates = False  # experts take no compensation bias
    linear_down = False  # each expert's down_proj sees only the tokens routed to it
    align = A.GROUPED_MM_ALIGN  # grouped_mm needs 16-byte strides
    traceable = False  # torch.onnx cannot trace transformers' fused experts (grouped_mm)
    fused_keys = ("gate", "up", "down")

    def stream_tensors(self, block: nn.Module, spec: ArchSpec) -> list[tuple[nn.Module, str, int]]:
        """The router reads the stream, the experts read it (gate_up_proj, dim 2) and write it (down_proj,
        dim 1)."""
        experts = A.get(block, spec.experts)
        return [(A.get(block, spec.router), "weight", 1), (experts, "gate_up_proj", 2), (experts, "down_proj", 1)]

    def lora_parameters(self, spec: ArchSpec, targets: list[str]) -> list[str]:
        """The fused expert tensors for the MLP targets (gate and up share ``gate_up_proj``)."""
        names = {"gate": "gate_up_proj", "up": "gate_up_proj", "down": "down_proj"}
        return list(dict.fromkeys(f"{spec.experts}.{names[key]}" for key in targets if key in names))

    def write_width(self, config: dict, width: dict) -> None:
        """The expert count and an expert's width (Qwen3-MoE keeps intermediate_size for its dense MLPs)."""
        config.update({key: width["experts"] for key in A.EXPERT_KEYS if key in config})
        config[A.expert_width_key(config)] = width["channels"]

    def record(self, block: nn.Module, spec: ArchSpec, dtype: torch.dtype, into: list) -> object:
        """Append one ``InputStats`` per expert to ``into`` and watch the experts' forward: each expert's
        down_proj input, act(gate) · up, over the tokens routed to it. Returns the hook handle."""
        experts = block.get_submodule(spec.experts)
        stats = [InputStats() for _ in range(experts.num_experts)]
        into.append(stats)

        def hook(module, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).reshape(-1, module.gate_up_proj.shape[-1])
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            for e in index.unique().tolist():
                if e >= module.num_experts:  # the "no expert" sentinel of expert parallelism
                    continue
                token = torch.where(index == e)[0]
                gate, up = nn.functional.linear(x[token], module.gate_up_proj[e]).chunk(2, dim=-1)
                stats[e].add(module.act_fn(gate) * up, dtype)

        return experts.register_forward_pre_hook(hook, with_kwargs=True)

    def importance(self, block: nn.Module, spec: ArchSpec, stats: list[InputStats],
                   fn: Callable[[torch.Tensor, InputStats], torch.Tensor]) -> torch.Tensor:
        """(E, I): ``fn(down_proj[e] (D, I), stats of its input)`` for every expert; zeros for an expert no
        calibration token reached."""
        experts = block.get_submodule(spec.experts)
        reached = {e: fn(experts.down_proj[e], s) for e, s in enumerate(stats) if s.count}  # (I,) each
        like = next(iter(reached.values()), experts.down_proj[0, 0])  # the statistics' dtype (float32 on MPS)
        zeros = torch.zeros(experts.down_proj.shape[2], dtype=like.dtype, device=like.device)
        return torch.stack([reached.get(e, zeros) for e in range(len(stats))])

    def magnitude(self, block: nn.Module, spec: ArchSpec) -> torch.Tensor:
        """(E, I): the L2 norm of every channel's gate and up rows and down column, one expert's float32 copy at
        a time (a Mixtral-8x7B layer's fused gate_up is 3.8 GB in float32)."""
        experts = block.get_submodule(spec.experts)
        width, rows = experts.down_proj.shape[2], []
        for gate_up, down in zip(experts.gate_up_proj.detach(), experts.down_proj.detach()):
            square = gate_up.float().pow(2).sum(1)  # (2I,)
            rows.append((square[:width] + square[width:] + down.float().pow(2).sum(0)).sqrt())
        return torch.stack(rows)


DENSE, FUSED_EXPERTS = Dense(), FusedExperts()


def of(spec: ArchSpec) -> Dense | FusedExperts:
    """The MLP strategy of an architecture."""
    return FUSED_EXPERTS if spec.moe else DENSE
