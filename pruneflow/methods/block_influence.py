"""ShortGPT's Block Influence: BI_l = mean over tokens of 1 − cos(h_in, h_out) of block l (depth pruning).

A block that barely changes its input (BI ≈ 0) is the first to go; scores are per whole block. The same pass
scores the two sub-blocks of every block (pruneflow.units.subblocks) the same way: the attention by
1 − cos(h_in, h_mid) and the MLP by 1 − cos(h_mid, h_out), h_mid = h_in + attention — the input of the block's
second norm (``ArchSpec.norms``), where the model has one.
"""

from __future__ import annotations

import torch

from pruneflow.model import arch as A
from pruneflow.execution.passes import calibration_pass
from pruneflow.methods._hidden import cosine
from pruneflow.selection.scores import Scores
from pruneflow.units import subblocks


@torch.no_grad()
def score(model, spec, windows, runtime, batch_size: int = 8, **_) -> Scores:
    count = len(A.blocks(model, spec))
    totals = torch.zeros(count, 3, dtype=torch.float64)  # per block: attention, MLP, whole block
    mid_norm = spec.norms[1] if len(spec.norms) > 1 else None  # its input is h_in + attention
    held: dict[int, list[torch.Tensor]] = {}  # block → [h_in, h_mid] of the batch it is computing

    def influence(a: torch.Tensor, b: torch.Tensor) -> float:
        return (1 - cosine(a, b.to(a.device), runtime.accum_dtype)).sum().item()

    def hooks(i: int, block):
        def enter(_module, args, kwargs):
            held[i] = [(args[0] if args else kwargs["hidden_states"]).detach()]

        def middle(_module, args):
            held[i].append(args[0].detach())
            totals[i, 0] += influence(held[i][0], args[0])

        def leave(_module, args, kwargs, output):
            out = (output[0] if isinstance(output, tuple) else output).detach()
            states = held.pop(i)
            totals[i, 2] += influence(states[0], out)
            if len(states) > 1:
                totals[i, 1] += influence(states[1], out)

        handles = [block.register_forward_pre_hook(enter, with_kwargs=True),
                   block.register_forward_hook(leave, with_kwargs=True)]
        if mid_norm is not None:
            handles.append(block.get_submodule(mid_norm).register_forward_pre_hook(middle))
        return handles

    try:
        calibration_pass(model, spec, windows, runtime, hooks, state=(totals,), batch_size=batch_size,
                         desc="block influence")
    finally:
        held.clear()
    totals /= windows.numel()
    extra = {subblocks.NAME: totals[:, :2].clone()} if mid_norm is not None else {}
    return Scores(heads=[], channels=[], layers=totals[:, 2].clone(), comparable=True, extra=extra)
