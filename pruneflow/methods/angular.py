"""Angular distance (Gromov et al.): remove the contiguous run of n blocks whose input and output are closest,
d(l, n) = mean over tokens of arccos(cos(h_l, h_{l+n})) / π, with n the number of blocks that meets the ratio.
"""

from __future__ import annotations

import math

import torch

from pruneflow.model import arch as A
from pruneflow.errors import PruneflowError
from pruneflow.methods._hidden import boundary_distances
from pruneflow.selection.scores import Scores


def blocks_for_ratio(model, spec, ratio: float) -> int:
    """How many (average-sized) blocks come closest to removing ``ratio`` of the non-embedding parameters."""
    block_params = [sum(p.numel() for p in block.parameters()) for block in A.blocks(model, spec)]
    mean_block = sum(block_params) / len(block_params)
    non_embedding = A.count_parameters(model)["non_embedding"]
    return min(len(block_params) - 1, max(1, round(ratio * non_embedding / mean_block)))


@torch.no_grad()
def score(model, spec, windows, runtime, ratio: float | None = None, **_) -> Scores:
    if ratio is None:
        raise PruneflowError("method angular needs the target ratio to size its contiguous block")
    blocks = A.blocks(model, spec)
    n = blocks_for_ratio(model, spec, ratio)
    distance = boundary_distances(model, spec, windows, runtime, span=n,
                                  distance=lambda cos: cos.acos() / math.pi)  # (L − n + 1,)
    best = int(distance.argmin())
    layers = torch.ones(len(blocks), dtype=torch.float64)
    layers[best:best + n] = -1.0  # the chosen run goes first, in order
    return Scores(heads=[], channels=[], layers=layers + torch.arange(len(blocks)) * 1e-6, comparable=True,
                  extra={"block_size": n, "start": best, "distance": distance.tolist()})
