"""Next-token losses computed from the final hidden states a chunk of tokens at a time.

A full forward materialises logits of rows × T × vocab (4 GB in fp32 for a 32 × 256 batch at a 128k vocabulary);
here the LM head runs on at most :data:`LOGIT_BYTES` of fp32 logits at once (the loss's log-softmax holds about as
much again, the head's own output half of it in 16 bits). With gradients, each chunk is checkpointed, so its
logits are recomputed in the backward pass instead of being kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LOGIT_BYTES = 32 * 2**20  # fp32 logits of one chunk: 64 tokens at a 128k vocabulary, 2048 at 4096
IGNORE = -100


def lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone, head) of a causal LM (also under a peft wrapper): hidden states, then logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix, base), base.get_output_embeddings()  # an encoder: itself, None


def run_blocks(model: nn.Module, input_ids: torch.Tensor, causal_lm: bool = True):
    """A forward pass through the blocks only, for statistics hooked inside them: a causal LM's head (and its
    rows × T × vocab logits) is skipped."""
    if not causal_lm:
        return model(input_ids=input_ids)
    return lm_parts(model)[0](input_ids=input_ids, use_cache=False)


def chunk_rows(vocab: int) -> int:
    return max(1, LOGIT_BYTES // (4 * vocab))


def hidden_states(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, D) final hidden states (after the final norm): a causal LM's head input, an encoder's output."""
    backbone, head = lm_parts(model)
    cache = {"use_cache": False} if head is not None else {}  # an encoder keeps no cache
    return backbone(input_ids=input_ids, **cache).last_hidden_state


def _targets(input_ids: torch.Tensor) -> torch.Tensor:
    """(B·T,) the next token of every position; the last position of each row has none (ignored)."""
    targets = torch.full_like(input_ids, IGNORE)
    targets[:, :-1] = input_ids[:, 1:]
    return targets.reshape(-1)


@torch.no_grad()
def token_nll(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T - 1) float32 negative log-likelihood of every next token of ``input_ids`` (B, T)."""
    return hidden_nll(lm_parts(model)[1], hidden_states(model, input_ids), input_ids)


@torch.no_grad()
def hidden_nll(head: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T - 1) float32 next-token NLL from the final hidden states (B, T, D), the head a chunk at a time."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    targets = _targets(input_ids).to(rows.device)
    nll = torch.empty(len(rows), dtype=torch.float32, device=rows.device)
    step = chunk_rows(head.out_features)
    for start in range(0, len(rows), step):
        logits = head(rows[start:start + step].to(head.weight.device)).float()
        nll[start:start + step] = F.cross_entropy(logits, targets[start:start + step].to(logits.device),
                                                  reduction="none", ignore_index=IGNORE).to(nll.device)
    return nll.view(input_ids.shape)[:, :-1]


def _chunk_losses(head: nn.Module, rows: torch.Tensor, targets: torch.Tensor,
                  teacher_rows: torch.Tensor | None, teacher_head: nn.Module | None = None) -> torch.Tensor:
    """[Σ CE, Σ KL(teacher ‖ student)] over one chunk of positions."""
    logits = head(rows).float()
    ce = F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE)
    if teacher_rows is None:
        return torch.stack([ce, ce.new_zeros(())])
    with torch.no_grad():
        teacher = F.log_softmax((teacher_head or head)(teacher_rows).float(), dim=-1)
    kd = F.kl_div(F.log_softmax(logits, dim=-1), teacher, log_target=True, reduction="sum")
    return torch.stack([ce, kd])


def training_losses(model: nn.Module, input_ids: torch.Tensor, teacher_hidden: torch.Tensor | None = None,
                    teacher_head: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token CE, mean per-token KL(teacher ‖ student)) with gradients, chunked and checkpointed.

    ``teacher_hidden`` (B, T, D) are the teacher's final hidden states: the student's own head turns them into
    the teacher's logits (pruning heads, channels or blocks and LoRA leave the head untouched, so the two heads
    are the same weights), or ``teacher_head`` when the student's is narrower (the hidden unit).
    """
    _, head = lm_parts(model)
    hidden = hidden_states(model, input_ids)
    rows = hidden.reshape(-1, hidden.shape[-1])
    targets = _targets(input_ids).to(rows.device)
    teacher = None if teacher_hidden is None else \
        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).to(rows.device)
    total = rows.new_zeros(2, dtype=torch.float32)
    step = chunk_rows(head.out_features)
    for start in range(0, len(rows), step):
        part = slice(start, start + step)
        total = total + checkpoint(_chunk_losses, head, rows[part], targets[part],
                                   None if teacher is None else teacher[part], teacher_head, use_reentrant=False)
    batch, length = input_ids.shape
    return total[0] / (batch * (length - 1)), total[1] / (batch * length)
