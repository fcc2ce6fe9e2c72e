"""Minitron ("Compact language models via pruning and knowledge distillation"; NVIDIA Model-Optimizer's
``mcore_minitron``): importance from activation magnitudes, forward passes only.

For every calibration batch an activation ``x`` (batch, sequence, features) becomes ``mean_t |x|`` (batch,
features), whose squares are summed over the batch; the importance is the square root of that sum (an L2
norm over the batch of per-sample mean magnitudes). As Model-Optimizer computes it:
- hidden channels: on the outputs of each block's two norms (before attention, before the MLP), the square
  roots summed over all those norms (the final norm is not watched);
- MLP channels: on the input of down_proj;
- heads: on the input of o_proj, each head the L2 norm over its dimensions.
"""

from __future__ import annotations

import torch
from torch import nn

from pruneflow.model import arch as A
from pruneflow.errors import PruneflowError
from pruneflow.model.mlp import of as mlp_of
from pruneflow.selection.scores import Scores
from pruneflow.execution.passes import calibration_pass


class _Magnitude:
    """Σ over samples of (mean over the sequence of |x|)², per feature, in the accumulation dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.total = dtype, None

    def add(self, x: torch.Tensor) -> None:
        per_sample = x.detach().abs().to(self.dtype).mean(1) if x.dim() == 3 else x.detach().abs().to(self.dtype)
        squares = (per_sample * per_sample).reshape(-1, x.shape[-1]).sum(0)
        self.total = squares if self.total is None else self.total + squares

    @property
    def importance(self) -> torch.Tensor:
        return self.total.sqrt()


@torch.no_grad()
def score(model: nn.Module, spec, windows, runtime, **_) -> Scores:
    if not spec.norms:
        raise PruneflowError("method minitron reads the outputs of each block's norms; this architecture's "
                             "ArchSpec names none")
    head_dim = A.geometry(model.config).head_dim
    dense = mlp_of(spec).linear_down
    norms: list[list[_Magnitude]] = []
    attn: list[_Magnitude] = []
    mlp: list[_Magnitude] = []
    heads, channels = [], []

    def hooks(i: int, block: nn.Module) -> list:
        dtype = runtime.accum_dtype
        norms.append([_Magnitude(dtype) for _ in spec.norms])
        attn.append(_Magnitude(dtype))
        mlp.append(_Magnitude(dtype))
        handles = [A.get(block, path).register_forward_hook(lambda _m, _a, out, s=stat: s.add(out))
                   for path, stat in zip(spec.norms, norms[i])]
        handles.append(A.get(block, spec.o).register_forward_pre_hook(lambda _m, args, s=attn[i]: s.add(args[0])))
        if dense:  # an MoE block's experts: Minitron scores no channels inside them (hidden only)
            handles.append(A.get(block, spec.down).register_forward_pre_hook(lambda _m, args, s=mlp[i]: s.add(args[0])))
        return handles

    def done(i: int, block: nn.Module) -> None:
        heads.append(attn[i].importance.reshape(-1, head_dim).norm(dim=1).float().cpu())
        if dense:
            channels.append(mlp[i].importance.float().cpu())

    calibration_pass(model, spec, windows, runtime, hooks, done, state=(norms, attn, mlp))
    hidden = sum(stat.importance.cpu() for block in norms for stat in block)
    return Scores(heads=heads, channels=channels, hidden=hidden.float())
