"""SLEB (Song et al. 2024): greedily remove the block whose removal raises the calibration loss least.

Each round skips every remaining block in turn (the block returns its input) and measures the mean
next-token loss on the calibration windows (``score.objective``: or the KL to the unmasked model, or on an encoder
the distance of the final hidden states); the cheapest block is removed before the next round. Forward
passes only: rounds × blocks passes over the calibration set, as candidates of the execution layer (in
memory, streamed or on workers). Scores rank blocks by removal order.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from pruneflow.model import arch as A
from pruneflow.execution import passes
from pruneflow.errors import PruneflowError
from pruneflow.execution.candidates import Candidates
from pruneflow.methods.angular import blocks_for_ratio
from pruneflow.selection.scores import Scores


BATCH = 8  # calibration windows per forward pass, as the perplexity protocol batches them


def removal_losses(model, spec, windows: torch.Tensor, runtime, removed: list[int], trials: list[int],
                   objective: passes.Objective | None = None) -> list[float]:
    """Mean ``objective`` (default: next-token loss) on ``windows`` with the blocks of ``removed`` and one more of
    ``trials`` skipped (passing their input through), one candidate per trial."""
    candidates = Candidates.of_blocks([{*removed, t} for t in trials], len(A.blocks(model, spec)))
    return passes.losses(model, spec, windows, candidates, runtime, rows_per_forward=min(BATCH, len(windows)),
                         desc="sleb candidates", objective=objective).tolist()


@torch.no_grad()
def score(model, spec, windows, runtime, ratio: float | None = None, objective: str = "auto", **_) -> Scores:
    if ratio is None:
        raise PruneflowError("method sleb needs the target ratio to know how many blocks to remove")
    measure = passes.objective(model, spec, windows, runtime, objective)
    n_blocks = len(A.blocks(model, spec))
    rounds = blocks_for_ratio(model, spec, ratio)
    removed: list[int] = []
    losses: list[float] = []
    for _ in tqdm(range(rounds), desc="sleb rounds", leave=False):
        trials = [i for i in range(n_blocks) if i not in removed]
        values = removal_losses(model, spec, windows, runtime, removed, trials, measure)
        best = min(zip(values, trials))[1]  # the lowest loss; of equal losses, the first block
        removed.append(best)
        losses.append(values[trials.index(best)])
    layers = torch.ones(n_blocks, dtype=torch.float64)
    for rank, index in enumerate(removed):
        layers[index] = -1.0 + rank / n_blocks  # removal order: first removed scores lowest
    return Scores(heads=[], channels=[], layers=layers, comparable=True,
                  extra={"removal_order": removed, "calibration_loss": losses, "objective": measure.kind})
