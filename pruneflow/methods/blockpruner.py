"""BlockPruner (Zhong et al. 2024, "Fine-grained Pruning for Large Language Models"): remove attention and MLP
sub-blocks one at a time, each round the one whose removal raises calibration perplexity least.

Every block is two residual sub-blocks (pruneflow.units.subblocks). Each round removes every remaining
sub-block in turn from the model as pruned so far — a removed attention or MLP adds nothing to the residual
stream, as masking all its heads or channels does — measures the mean next-token loss on the calibration
windows (perplexity is its exponential: the same order; ``score.objective``: or the KL to the unmasked model, or
on an encoder the distance of the final hidden states) and removes the cheapest before the next round. Rounds
go on until the removed parameters reach the target ratio. Forward passes only: the trials of a round are
candidates of the execution layer (in memory, streamed or on workers). Scores rank the sub-blocks by removal
order (``Scores.extra["subblocks"]``, (L, 2)).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from pruneflow.model import arch as A
from pruneflow.units.apply import layer_shapes
from pruneflow.errors import PruneflowError
from pruneflow.execution import passes
from pruneflow.execution.candidates import Candidates
from pruneflow.selection.scores import Scores
from pruneflow.units import subblocks

BATCH = 8  # calibration windows per forward pass, as the perplexity protocol batches them


def candidates(shapes, removed: list[tuple[int, int]], trials: list[tuple[int, int]]) -> Candidates:
    """One candidate per trial: the sub-blocks of ``removed`` and the trial's masked out (all heads or all
    channels of the block)."""
    heads = [torch.ones(len(trials), s.heads, dtype=torch.bool) for s in shapes]
    channels = [torch.ones(len(trials), s.channels, dtype=torch.bool) for s in shapes]
    for row, trial in enumerate(trials):
        for i, kind in (*removed, trial):
            (heads if kind == 0 else channels)[i][row] = False
    return Candidates(len(trials), heads=heads, channels=channels)


@torch.no_grad()
def score(model, spec, windows, runtime, ratio: float | None = None, objective: str = "auto", **_) -> Scores:
    if ratio is None:
        raise PruneflowError("method blockpruner needs the target ratio to know how many sub-blocks to remove")
    measure = passes.objective(model, spec, windows, runtime, objective)
    shapes = layer_shapes(model, spec)
    target = ratio * A.count_parameters(model)["non_embedding"]
    remaining = [(i, kind) for i in range(len(shapes)) for kind in (0, 1)]
    removed: list[tuple[int, int]] = []
    losses: list[float] = []
    total = 0
    with tqdm(total=round(target), desc="blockpruner rounds", unit="param", leave=False) as bar:
        while total < target and remaining:
            values = passes.losses(model, spec, windows, candidates(shapes, removed, remaining), runtime,
                                   rows_per_forward=min(BATCH, len(windows)), desc="blockpruner candidates",
                                   objective=measure).tolist()
            best = min(zip(values, remaining))[1]  # the lowest loss; of equal losses, the first sub-block
            losses.append(values[remaining.index(best)])
            remaining.remove(best)
            removed.append(best)
            cost = subblocks.costs(shapes[best[0]])[best[1]]
            total += cost
            bar.update(cost)
    return Scores(heads=[], channels=[], comparable=True,
                  extra={subblocks.NAME: subblocks.ranks(removed, len(shapes)),
                         "removal_order": [f"{subblocks.KINDS[k]} {i}" for i, k in removed],
                         "calibration_loss": losses, "objective": measure.kind})
