"""What a candidate sub-model is scored by (``score.objective``): the one per-token measure the candidate losses
of Bonsai, SLEB, BlockPruner and the allocation search sum.

- ``loss``: next-token cross-entropy on the calibration text (the papers' criterion; causal LMs only);
- ``kl``: KL(unmasked ‖ candidate) of the next-token distributions, the unmasked model's from its own final hidden
  states through the same LM head a chunk at a time (causal LMs only): how far the candidate moved from the model
  it is cut from, whatever the text says;
- ``hidden``: 1 − cos(candidate's final hidden state, the unmasked model's) per token: the only one an encoder has
  (it has no next token), and usable on causal LMs too.
``auto`` is each method's paper: ``loss`` on a causal LM, ``hidden`` on an encoder.

The reference (the unmasked model's final hidden states of the windows, (n, T, D) in the model's dtype on the host:
2 GiB for 128 windows of 2048 tokens at D = 4096 in bf16) is computed once per window set by
:func:`pruneflow.execution.passes.objective` and travels with the objective to the workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pruneflow.errors import PruneflowError
from pruneflow.execution.losses import chunk_rows, hidden_nll

OBJECTIVES = ("loss", "kl", "hidden")
CAUSAL_ONLY = ("loss", "kl")


def resolve(kind: str, causal_lm: bool) -> str:
    """``score.objective`` for a model: ``auto`` is the method's paper (``loss``; ``hidden`` on an encoder); a
    next-token objective on an encoder is refused, naming what applies."""
    if kind == "auto":
        return "loss" if causal_lm else "hidden"
    if kind not in OBJECTIVES:
        raise PruneflowError(f"score.objective: {kind!r} is not one of auto, {', '.join(OBJECTIVES)}")
    if kind in CAUSAL_ONLY and not causal_lm:
        raise PruneflowError(f"score.objective: {kind} compares next-token predictions and needs a causal LM; this "
                             f"model is an encoder: use objective hidden (or auto)")
    return kind


@dataclass
class Objective:
    """One of :data:`OBJECTIVES`, with the unmasked model's final hidden states of the windows where it needs them
    (``reference``: (n, T, D), row i for window i)."""

    kind: str = "loss"
    reference: torch.Tensor | None = None

    @property
    def reference_bytes(self) -> int:
        """What the reference holds on the host for as long as candidates are measured (0 for the loss)."""
        return 0 if self.reference is None else self.reference.numel() * self.reference.element_size()

    def positions(self, length: int) -> int:
        """How many positions of a window of ``length`` tokens the measure has (the loss: every next token)."""
        return length - 1 if self.kind == "loss" else length

    def per_token(self, head: nn.Module | None, hidden: torch.Tensor, input_ids: torch.Tensor,
                  picks: torch.Tensor) -> torch.Tensor:
        """(B, positions) float32: the measure at every position of the batch whose final hidden states are
        ``hidden`` (B, T, D); ``picks`` (B,): the window of each row."""
        if self.kind == "loss":
            return hidden_nll(head, hidden, input_ids)
        reference = self.reference[picks.cpu()].to(hidden.device)
        if self.kind == "hidden":
            return 1 - F.cosine_similarity(hidden.float(), reference.float(), dim=-1)
        return hidden_kl(head, reference, hidden)


@torch.no_grad()
def hidden_kl(head: nn.Module, reference: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """(B, T) float32 KL(p ‖ q) per position, p from the ``reference`` final hidden states, q from ``hidden``, both
    through ``head`` a chunk of positions at a time (the logits of a whole batch never exist at once)."""
    rows, ref = hidden.reshape(-1, hidden.shape[-1]), reference.reshape(-1, reference.shape[-1])
    out = torch.empty(len(rows), dtype=torch.float32, device=rows.device)
    step = chunk_rows(head.out_features)
    for start in range(0, len(rows), step):
        part = slice(start, start + step)
        p = F.log_softmax(head(ref[part].to(head.weight.device)).float(), dim=-1)
        q = F.log_softmax(head(rows[part].to(head.weight.device)).float(), dim=-1)
        out[part] = F.kl_div(q, p, log_target=True, reduction="none").sum(-1).to(out.device)
    return out.view(hidden.shape[:2])
