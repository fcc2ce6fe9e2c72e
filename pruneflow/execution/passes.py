"""What methods, search and evaluation ask of the execution layer (see the package docstring):
:func:`calibration_pass` (hooked statistics), :func:`losses` (N candidate sub-models), :func:`nll_batches` (the
model itself), :func:`each_block` (data-free scorers). The answers are the same in memory, streamed and on
workers; only how long they take differs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from pruneflow.model import arch as A
from pruneflow.model.arch import ArchSpec
from pruneflow.execution import replicas, streaming
from pruneflow.execution.candidates import Batches, Candidates
from pruneflow.execution.streaming import BATCH, each_block
from pruneflow.execution.losses import hidden_states, token_nll
from pruneflow.execution.objectives import Objective, resolve
from pruneflow.execution.runtime import Runtime

Hooks = Callable[[int, nn.Module], list]

__all__ = ["Candidates", "Objective", "calibration_pass", "each_block", "losses", "nll_batches", "objective"]


def losses(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, candidates: Candidates, runtime: Runtime,
           rows_per_forward: int | None = None, desc: str = "candidates",
           objective: Objective | None = None) -> torch.Tensor:
    """(count,) float64 mean per-token ``objective`` (default: next-token loss; see :func:`objective`) of every
    candidate over ``windows`` (n, T); ``rows_per_forward`` (default n: one candidate per forward pass) rows of
    (candidate, window) per forward pass."""
    objective = objective or Objective()
    n, length = windows.shape
    batches = Batches.plan(candidates.count, n, rows_per_forward or n)
    sums = replicas.batch_sums(model, spec, windows, candidates, batches, runtime, desc, objective)
    total = torch.zeros(candidates.count, dtype=torch.float64)
    for owner, part in zip(batches.owners, sums):
        total.index_add_(0, owner, part)
    return total / (n * objective.positions(length))


@torch.no_grad()
def objective(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, runtime: Runtime, kind: str = "auto",
              batch_size: int = BATCH) -> Objective:
    """The :class:`Objective` ``kind`` (``score.objective``; ``auto``: the loss, or ``hidden`` on an encoder) for
    candidates of ``model`` on ``windows``, with the unmasked model's final hidden states where it needs them (one
    pass over the windows, in memory or streamed; kept on the host in the model's dtype)."""
    kind = resolve(kind, spec.causal_lm)
    if kind == "loss":
        return Objective(kind)
    batches = list(windows.split(batch_size))
    if streaming.is_streamed(model):  # the states it gathers on the host count in a CPU's budget
        held = windows.numel() * model.config.hidden_size * streaming.stream_of(model).dtype.itemsize \
            if runtime.device.type == "cpu" else 0
        states = streaming.token_nll_batches(model, spec, batches, runtime,
                                             measure=lambda head, hidden, b: hidden.cpu(), held=held)
    else:
        device = runtime.input_device(model)
        states = (hidden_states(model, batch.to(device)).cpu() for batch in batches)
    return Objective(kind, torch.cat(list(states)))


def nll_batches(model: nn.Module, batches: list[torch.Tensor], runtime: Runtime, desc: str | None = None):
    """(B, T - 1) next-token NLL of each batch of input ids, in order: the model itself, no masks (in memory
    batch by batch, the LM head a chunk of tokens at a time; streamed, groups of batches through the blocks)."""
    if streaming.is_streamed(model):
        spec = A.arch_for(model.config.model_type)
        yield from streaming.token_nll_batches(model, spec, batches, runtime)
        return
    device = runtime.input_device(model)
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=desc is None):
        yield token_nll(model, batch.to(device))


def calibration_pass(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, runtime: Runtime, hooks: Hooks,
                     done: Callable[[int, nn.Module], None] | None = None, state: tuple | None = None,
                     batch_size: int = BATCH, desc: str = "calibration forward") -> None:
    """Run ``windows`` through every block: ``hooks(i, block)`` registers what watches block ``i`` (returns the
    handles); ``done(i, block)`` runs once block ``i``'s statistics are complete, its weights loaded.

    ``state``: the lists, dicts or tensors the hooks fill with *sums* over tokens (partial sums of disjoint
    windows add up to the whole). Given it, the pass may run on the ``--workers``: each takes a contiguous share
    of the windows, their partial states are added in window order, then ``done`` runs here block by block.
    Without it the pass runs here (a caller whose hooks keep anything but sums)."""
    if state is not None and replicas.statistics(model, windows, runtime, hooks, state, batch_size, desc):
        if done is not None:
            for i, block in enumerate(each_block(model, spec)):
                done(i, block)
        return
    streaming.calibration_pass(model, spec, windows, runtime, hooks, done, batch_size, desc)
