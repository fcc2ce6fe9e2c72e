"""The losses of N candidate sub-models of the current model: the one question search-like methods ask.

A candidate is what it removes, as keep masks on the dense model — query heads and MLP channels per layer
(masks on o_proj / down_proj inputs, :mod:`pruneflow.units.masking`), whole blocks (the block passes its input
through) — never a weight copy. Bonsai's sub-models, the allocation search's offspring and SLEB's trial
removals are all :class:`Candidates`; :func:`losses` returns each one's mean next-token loss on the windows.

Rows of a forward pass are (candidate, window) pairs in candidate-major order, ``rows_per_forward`` at a time,
each row computed with its own candidate's masks (several candidates per forward pass). How the batches run is
decided by :mod:`pruneflow.execution.passes` (here: one process's batches; :mod:`.replicas`: Ray workers), not
by the caller: in memory batch by batch; streamed,
layer-major (``streaming.token_nll_batches``, each block read once per group of batches); with
``runtime.workers`` on Ray, the batches split into contiguous runs over replicas of the model and gathered in
order. Every batch is the same batch whichever way it runs, and the per-row sums are added in batch order in
float64, so the losses — and the plans chosen from them — do not depend on the way.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from pruneflow.model import arch as A
from pruneflow.model.arch import ArchSpec
from pruneflow.units.masking import block_masks
from pruneflow.execution.runtime import Runtime
from pruneflow.execution import streaming
from pruneflow.execution.losses import hidden_states, lm_parts
from pruneflow.execution.objectives import Objective


@dataclass
class Candidates:
    """``count`` sub-models as keep masks (True keeps): per layer (count, H_l) query heads and (count, I_l) MLP
    channels (None: not varied), and (count, L) blocks (False: the block is skipped; None: none skipped)."""
    count: int
    heads: list[torch.Tensor] | None = None
    channels: list[torch.Tensor] | None = None
    blocks: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> "Candidates":
        """The candidates ``index`` names, in that order (one per batch row)."""
        def pick(masks):
            return None if masks is None else [m[index] for m in masks]

        return Candidates(len(index), pick(self.heads), pick(self.channels),
                          None if self.blocks is None else self.blocks[index])

    @classmethod
    def of_blocks(cls, skipped: list[set[int]], n_layers: int) -> "Candidates":
        """One candidate per set of skipped blocks."""
        blocks = torch.ones(len(skipped), n_layers, dtype=torch.bool)
        for row, indices in enumerate(skipped):
            blocks[row, list(indices)] = False
        return cls(len(skipped), blocks=blocks)


@contextmanager
def skip_rows(block: nn.Module, keep: torch.Tensor):
    """Rows b of a batch with ``keep[b]`` False leave ``block`` as they entered it (a residual no-op)."""
    def hook(_module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        out = output[0] if isinstance(output, tuple) else output
        mixed = torch.where(keep.to(out.device)[:, None, None], out, x)
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

    handle = block.register_forward_hook(hook, with_kwargs=True)
    try:
        yield block
    finally:
        handle.remove()


@contextmanager
def row_masks(block: nn.Module, spec: ArchSpec, i: int, rows: Candidates, head_dim: int, device: torch.device):
    """Block ``i`` computes row b of each batch as candidate ``rows``'s row b has it."""
    with ExitStack() as stack:
        heads = None if rows.heads is None else rows.heads[i].to(device=device, dtype=torch.float32)
        channels = None if rows.channels is None else rows.channels[i].to(device=device, dtype=torch.float32)
        if heads is not None or channels is not None:
            stack.enter_context(block_masks(block, spec, head_dim, heads, channels))
        if rows.blocks is not None and not bool(rows.blocks[:, i].all()):
            stack.enter_context(skip_rows(block, rows.blocks[:, i]))
        yield block


@dataclass
class Batches:
    """How ``count`` candidates × ``n`` windows are cut into forward passes: per batch, the candidate (owner) and
    the window of each row."""
    owners: list[torch.Tensor]
    picks: list[torch.Tensor]

    @classmethod
    def plan(cls, count: int, n: int, rows_per_forward: int) -> "Batches":
        total = count * n
        starts = range(0, total, rows_per_forward)
        rows = [start + torch.arange(min(rows_per_forward, total - start)) for start in starts]
        return cls(owners=[r // n for r in rows], picks=[r % n for r in rows])

    def part(self, start: int, stop: int) -> "Batches":
        return Batches(self.owners[start:stop], self.picks[start:stop])


@torch.no_grad()
def batch_sums(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, candidates: Candidates, batches: Batches,
               runtime: Runtime, desc: str = "candidates", progress: Callable[[int], None] | None = None,
               objective: Objective | None = None) -> list[torch.Tensor]:
    """Per batch, (B,) float64 sums of each row's per-token ``objective`` (default: next-token NLL), on this
    process's model (in memory or streamed). ``progress(k)``: k more batches done."""
    objective = objective or Objective()
    head_dim = A.geometry(model.config).head_dim
    inputs = [windows[pick] for pick in batches.picks]
    rows = [candidates.rows(owner) for owner in batches.owners]
    out: list[torch.Tensor] = []
    if streaming.is_streamed(model):  # layer-major: as many batches as the budget carries advance a block at a time
        def around(i, block, b):
            return row_masks(block, spec, i, rows[b], head_dim, runtime.device)

        def measure(head, hidden, b):
            return objective.per_token(head, hidden, inputs[b].to(hidden.device), batches.picks[b])

        # the objective's reference is on the host: in the budget's memory when the model runs on the CPU
        held = objective.reference_bytes if runtime.device.type == "cpu" else 0
        for values in streaming.token_nll_batches(model, spec, inputs, runtime, around, measure, held):
            out.append(values.cpu().double().sum(1))
            if progress:
                progress(1)
        return out
    device = runtime.input_device(model)
    blocks = A.blocks(model, spec)
    head = lm_parts(model)[1]
    for batch, row, pick in tqdm(list(zip(inputs, rows, batches.picks)), desc=desc, unit="batch", leave=False,
                                 disable=progress is not None):
        with ExitStack() as stack:
            for i, block in enumerate(blocks):
                stack.enter_context(row_masks(block, spec, i, row, head_dim, device))
            batch = batch.to(device)
            values = objective.per_token(head, hidden_states(model, batch), batch, pick)
            out.append(values.cpu().double().sum(1))  # float64 on the host (MPS has none)
        if progress:
            progress(1)
        runtime.release_host()
    return out
