"""SLEB (Song et al. 2024): greedily remove the block whose removal raises the calibration loss least.

Each round skips every remaining block in turn (the block returns its input) and measures the mean
next-token loss on the calibration windows; the cheapest block is removed before the next round. Forward
passes only: rounds × blocks passes over the calibration set. Scores rank blocks by removal order.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from tqdm import tqdm

from pruneflow import arch as A
from pruneflow.errors import PruneflowError
from pruneflow.evaluate import perplexity
from pruneflow.methods.angular import blocks_for_ratio
from pruneflow.scores import Scores


@contextmanager
def skipped(blocks, indices: set[int]):
    """Blocks in ``indices`` pass their input through unchanged."""
    def identity(_module, args, kwargs, _output):
        return args[0] if args else kwargs["hidden_states"]

    handles = [blocks[i].register_forward_hook(identity, with_kwargs=True) for i in indices]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def calibration_loss(model, windows: torch.Tensor, runtime=None) -> float:
    """Mean next-token loss over the calibration windows (the perplexity protocol on exactly these windows)."""
    return math.log(perplexity(model, windows.reshape(-1), windows.shape[1], runtime=runtime))


@torch.no_grad()
def score(model, spec, windows, runtime, ratio: float | None = None, **_) -> Scores:
    if ratio is None:
        raise PruneflowError("method sleb needs the target ratio to know how many blocks to remove")
    if not spec.causal_lm:
        raise PruneflowError("method sleb scores by next-token loss and needs a causal LM")
    blocks = A.blocks(model, spec)
    rounds = blocks_for_ratio(model, spec, ratio)
    removed: list[int] = []
    losses: list[float] = []
    for _ in tqdm(range(rounds), desc="sleb rounds", leave=False):
        trials = {}
        for candidate in (i for i in range(len(blocks)) if i not in removed):
            with skipped(blocks, {*removed, candidate}):
                trials[candidate] = calibration_loss(model, windows, runtime)
        best = min(trials, key=lambda i: (trials[i], i))
        removed.append(best)
        losses.append(trials[best])
    layers = torch.ones(len(blocks), dtype=torch.float64)
    for rank, index in enumerate(removed):
        layers[index] = -1.0 + rank / len(blocks)  # removal order: first removed scores lowest
    return Scores(heads=[], channels=[], layers=layers, comparable=True,
                  extra={"removal_order": removed, "calibration_loss": losses})
