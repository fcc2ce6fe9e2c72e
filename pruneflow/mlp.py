"""The MLP of a block as a strategy: dense (gate/up/down Linears) or fused experts (transformers 5 keeps every
expert of an MoE block in 3-D ``gate_up_proj`` (E, 2I, D) / ``down_proj`` (E, D, I) tensors).

Generic statistics code (``scores``, the ``magnitude`` method) asks :func:`of` ``(spec)`` what the MLP's
down_proj sees, a channel importance and channel magnitudes, and never branches on MoE itself: a dense block's
answers are (I,) per channel, a fused-experts block's (E, I), every expert's own channels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pruneflow.arch import ArchSpec
from pruneflow.stats import InputStats


class Dense:
    """gate/up/down Linear layers: one set of channels per block."""

    compensates = True  # a down_proj bias can take FLAP's compensation

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
