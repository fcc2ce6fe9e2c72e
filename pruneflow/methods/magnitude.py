"""Data-free baseline: the L2 norm of all weights a unit owns (q rows + o columns; gate/up rows + down column,
of every expert's own channels in an MoE block)."""

from __future__ import annotations

import torch

from pruneflow.model import arch as A
from pruneflow.model import mlp as M
from pruneflow.execution.passes import each_block
from pruneflow.selection.scores import Scores


@torch.no_grad()
def score(model, spec, windows=None, runtime=None, **_) -> Scores:
    geo = A.geometry(model.config)
    heads, channels = [], []
    for block in each_block(model, spec):  # streamed: one block in memory at a time
        q = A.get(block, spec.q).weight.float()  # (H·d, hidden)
        o = A.get(block, spec.o).weight.float()  # (hidden, H·d)
        head_sq = q.pow(2).sum(1).reshape(-1, geo.head_dim).sum(1) + o.pow(2).sum(0).reshape(-1, geo.head_dim).sum(1)
        heads.append(head_sq.sqrt().cpu())
        channels.append(M.of(spec).magnitude(block, spec).cpu())  # (I,), or (E, I) inside every expert
    return Scores(heads=heads, channels=channels)
