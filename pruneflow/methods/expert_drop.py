"""Layer-wise expert pruning of "Not All Experts are Equal" (Lu et al., ACL 2024; code: Lucky-Lance/
Expert_Sparsity, ``layerwise_pruning``): in every MoE block, of all the ways to keep r experts, the one whose
block output on the calibration tokens stays closest to the dense block's — the loss of a combination is the
sum over calibration batches of ‖Z − Z'‖₂ (Frobenius), Z' the block's output with the removed experts' router
logits at −inf. Every block sees the dense model's activations (one forward pass), and r is the same in every
block (the count ``prune.ratio`` asks for). Each combination is evaluated exactly, as the paper's code does:
every expert's output on a batch is computed once and the combinations re-route over them.

Scores: 1 for the experts of the best combination, 0 for the others (selection removes exactly those);
``extra["expert_drop"]["loss"]``: per block, the best combination's loss and the dense output's norm.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from pruneflow import arch as A
from pruneflow import experts as X
from pruneflow.errors import PruneflowError
from pruneflow.methods.options import ExpertDropParams
from pruneflow.scores import Scores
from pruneflow.streaming import calibration_pass


def combinations(model: nn.Module, spec, ratio: float, limit: int) -> tuple[int, list[tuple[int, ...]]]:
    """(experts removed per block, every combination of them) for ``ratio``; refuses more than ``limit``."""
    removed = X.removal_count(model, spec, ratio)
    count = A.blocks(model, spec)[0].get_submodule(spec.experts).num_experts
    if any(b.get_submodule(spec.experts).num_experts != count for b in A.blocks(model, spec)):
        raise PruneflowError("method expert_drop removes the same experts count from blocks of one size; this "
                             "model's blocks have different expert counts: use router_weighted")
    total = math.comb(count, removed)
    if total > limit:
        raise PruneflowError(f"method expert_drop would evaluate C({count}, {removed}) = {total:,} combinations "
                             f"per layer, above score.expert_drop.max_combinations={limit:,}: raise it, or use "
                             f"router_weighted (scores each expert once)")
    return removed, list(itertools.combinations(range(count), removed))


@torch.no_grad()
def score(model: nn.Module, spec, windows, runtime, ratio=None, config: ExpertDropParams | None = None,
          **_) -> Scores:
    X.check(model, spec)
    config = config or ExpertDropParams()
    removed, dropped_sets = combinations(model, spec, ratio, config.max_combinations)
    dtype = runtime.accum_dtype
    losses: list[torch.Tensor] = []
    dense_norms: list[float] = []

    def hooks(i: int, block: nn.Module) -> list:
        router, experts = X.parts(block, spec)
        losses.append(torch.zeros(len(dropped_sets), dtype=torch.float64))
        dense_norms.append(0.0)
        masks = torch.zeros(len(dropped_sets), experts.num_experts, dtype=torch.bool)
        for c, dropped in enumerate(dropped_sets):
            masks[c, list(dropped)] = True

        def hook(_module, args, kwargs, output):
            x = (args[0] if args else kwargs["hidden_states"])
            x = x.reshape(-1, x.shape[-1])
            z = (output[0] if isinstance(output, tuple) else output).reshape(x.shape).to(dtype)
            outputs = torch.stack([X.expert_output(experts, e, x) for e in range(experts.num_experts)])  # (E, T, D)
            logits = X.router_logits(router, x)
            tokens = torch.arange(x.shape[0], device=x.device)[:, None]
            batch = torch.empty(len(dropped_sets), dtype=torch.float64, device=x.device)  # no sync per combination
            for c in range(len(dropped_sets)):
                weights, index = X.route(router, logits, masks[c])
                rebuilt = (outputs[index, tokens].to(dtype) * weights[..., None].to(dtype)).sum(1)  # (T, D)
                batch[c] = torch.linalg.vector_norm(z - rebuilt)
            losses[i] += batch.cpu()
            dense_norms[i] += torch.linalg.vector_norm(z).item()

        return [A.get(block, spec.experts.rpartition(".")[0]).register_forward_hook(hook, with_kwargs=True)]

    calibration_pass(model, spec, windows, runtime, hooks)
    scores, best = [], []
    for i, block_losses in enumerate(losses):
        c = int(torch.argmin(block_losses))  # the first of equal losses, as min() over the paper's dict
        keep = torch.ones(A.blocks(model, spec)[i].get_submodule(spec.experts).num_experts)
        keep[list(dropped_sets[c])] = 0
        scores.append(keep)
        best.append({"dropped": list(dropped_sets[c]), "loss": float(block_losses[c]), "dense_norm": dense_norms[i]})
    return Scores(heads=[], channels=[], experts=scores, comparable=True, extra={"expert_drop": {"loss": best}})
