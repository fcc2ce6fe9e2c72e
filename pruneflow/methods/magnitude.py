"""Data-free baseline: the L2 norm of all weights a unit owns (q rows + o columns; gate/up rows + down column,
of every expert's own channels in an MoE block)."""

from __future__ import annotations

import torch

from pruneflow import arch as A
from pruneflow import expert_channels
from pruneflow.runtime import Runtime
from pruneflow.scores import Scores


@torch.no_grad()
def score(model, spec, windows=None, runtime=None, **_) -> Scores:
    geo = A.geometry(model.config)
    heads, channels = [], []
    for block in (runtime or Runtime()).blocks(model, spec):  # streamed: one block in memory at a time
        q = A.get(block, spec.q).weight.float()  # (H·d, hidden)
        o = A.get(block, spec.o).weight.float()  # (hidden, H·d)
        head_sq = q.pow(2).sum(1).reshape(-1, geo.head_dim).sum(1) + o.pow(2).sum(0).reshape(-1, geo.head_dim).sum(1)
        heads.append(head_sq.sqrt().cpu())
        if spec.moe:  # (E, I): the channels inside every expert
            channels.append(expert_channels.magnitude(A.get(block, spec.experts)).cpu())
            continue
        channel_sq = A.get(block, spec.up).weight.float().pow(2).sum(1) + A.get(block, spec.down).weight.float().pow(2).sum(0)
        if spec.gate:
            channel_sq = channel_sq + A.get(block, spec.gate).weight.float().pow(2).sum(1)
        channels.append(channel_sq.sqrt().cpu())
    return Scores(heads=heads, channels=channels)
