"""Router-weighted expert importance: for every expert, the sum over the calibration tokens routed to it of its
routing weight times the L2 norm of its output — router frequency × gate weight × output norm in one number.
This is MoE-Pruner's hint from the router (Xie et al., 2024, which weights Wanda's per-weight score by the gate)
taken to whole experts, pruneflow's own expert-level form; forward passes only, the dense model's routing.
"""

from __future__ import annotations

import torch
from torch import nn

from pruneflow.model import arch as A
from pruneflow.units import experts as X
from pruneflow.selection.scores import Scores
from pruneflow.execution.passes import calibration_pass


@torch.no_grad()
def score(model: nn.Module, spec, windows, runtime, **_) -> Scores:
    X.check(model, spec)
    dtype = runtime.accum_dtype
    totals: list[torch.Tensor] = []
    routed: list[torch.Tensor] = []

    def hooks(i: int, block: nn.Module) -> list:
        _, experts = X.parts(block, spec)
        totals.append(torch.zeros(experts.num_experts, dtype=dtype))
        routed.append(torch.zeros(experts.num_experts, dtype=torch.long))

        def hook(module, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).reshape(-1, module.gate_up_proj.shape[-1])
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            for e in index.unique().tolist():
                if e >= module.num_experts:  # the "no expert" sentinel of expert parallelism
                    continue
                token, slot = torch.where(index == e)
                norms = X.expert_output(module, e, x[token]).to(dtype).norm(dim=-1)
                totals[i][e] += (weights[token, slot].to(dtype) * norms).sum().cpu()
                routed[i][e] += token.numel()

        return [A.get(block, spec.experts).register_forward_pre_hook(hook, with_kwargs=True)]

    calibration_pass(model, spec, windows, runtime, hooks, state=(totals, routed))
    return Scores(heads=[], channels=[], experts=[t.float() for t in totals],
                  extra={"router_weighted": {"routed_tokens": routed}})
