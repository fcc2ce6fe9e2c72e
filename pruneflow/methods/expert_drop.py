"""Layer-wise expert pruning of "Not All Experts are Equal" (Lu et al., ACL 2024; code: Lucky-Lance/
Expert_Sparsity, ``layerwise_pruning``): in every MoE block, of all the ways to keep r experts, the one whose
block output on the calibration tokens stays closest to the dense block's — the loss of a combination is the
sum over calibration batches of ‖Z − Z'‖₂ (Frobenius), Z' the block's output with the removed experts' router
logits at −inf. Every block sees the dense model's activations (one forward pass), and r is the same in every
block (the count ``prune.ratio`` asks for). Each combination is evaluated exactly, as the paper's code does: every expert's output on a batch is computed once,
and each combination's loss follows from the per-token Gram matrix of those outputs (see ``_moments``), so a
combination costs k² numbers a token rather than a forward pass.

Scores: 1 for the experts of the best combination, 0 for the others (selection removes exactly those);
``extra["expert_drop"]["loss"]``: per block, the best combination's loss and the dense output's norm.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from pruneflow.model import arch as A
from pruneflow.units import experts as X
from pruneflow.errors import PruneflowError
from pruneflow.methods.options import ExpertDropParams
from pruneflow.selection.scores import Scores
from pruneflow.execution.passes import calibration_pass

CHUNK_BYTES = 256 * 2**20  # the re-routed outputs of this many bytes' worth of combinations at a time


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


def _moments(experts: nn.Module, x: torch.Tensor, z: torch.Tensor, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token t, the Gram matrix of the experts' outputs G_t = O_t O_tᵀ (T, E, E) and their products with the
    dense block output O_t z_t (T, E): then ‖z_t − Σ_j w_j O_{j,t}‖² = ‖z_t‖² − 2 wᵀ O_t z_t + wᵀ G_t w for any
    routing weights w, k² numbers a token instead of k × hidden (exact; in the accumulation dtype)."""
    outputs = torch.stack([X.expert_output(experts, e, x).to(dtype) for e in range(experts.num_experts)])  # (E,T,D)
    return torch.einsum("etd,ftd->tef", outputs, outputs), torch.einsum("etd,td->te", outputs, z)


def _distance(gram: torch.Tensor, cross: torch.Tensor, squares: torch.Tensor, weights: torch.Tensor,
              index: torch.Tensor) -> torch.Tensor:
    """(c,) ‖Z − Z'‖₂ (Frobenius, over the batch's tokens) for c routings (weights, index: (c, T, k))."""
    tokens = torch.arange(index.shape[1], device=index.device)
    g = gram[tokens[None, :, None, None], index[..., :, None], index[..., None, :]]  # (c, T, k, k)
    cross_w = (cross[tokens[None, :, None], index] * weights).sum(-1)  # (c, T)
    quadratic = torch.einsum("ctk,ctkl,ctl->ct", weights, g, weights)
    return (squares - 2 * cross_w + quadratic).clamp_min(0).sum(-1).sqrt()


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
            gram, cross = _moments(experts, x, z, dtype)
            squares = (z * z).sum(-1)  # (T,)
            logits = X.router_logits(router, x)
            batch = torch.empty(len(dropped_sets), dtype=dtype, device=x.device)  # no sync per combination
            chunk = max(1, CHUNK_BYTES // (x.shape[0] * router.top_k ** 2 * dtype.itemsize))
            on_device = masks.to(x.device)
            for start in range(0, len(dropped_sets), chunk):
                weights, index = X.route(router, logits, on_device[start:start + chunk])  # (c, T, k)
                batch[start:start + chunk] = _distance(gram, cross, squares, weights.to(dtype), index)
            losses[i] += batch.cpu()
            dense_norms[i] += squares.sum().sqrt().item()

        return [A.get(block, spec.experts.rpartition(".")[0]).register_forward_hook(hook, with_kwargs=True)]

    calibration_pass(model, spec, windows, runtime, hooks, state=(losses, dense_norms))
    scores, best = [], []
    for i, block_losses in enumerate(losses):
        c = int(torch.argmin(block_losses))  # the first of equal losses, as min() over the paper's dict
        keep = torch.ones(A.blocks(model, spec)[i].get_submodule(spec.experts).num_experts)
        keep[list(dropped_sets[c])] = 0
        scores.append(keep)
        best.append({"dropped": list(dropped_sets[c]), "loss": float(block_losses[c]), "dense_norm": dense_norms[i]})
    return Scores(heads=[], channels=[], experts=scores, comparable=True, extra={"expert_drop": {"loss": best}})
