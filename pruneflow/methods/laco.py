"""LaCo (Yang et al. 2024, "LaCo: Large Language Model Pruning via Layer Collapse"): fold the blocks after a
base block into it, keeping a merge while the merged model still represents the calibration text like the dense
one.

As the released code does: start at the top (base = last block − C, or the lowest layer), merge the C − 1 blocks after the base into
it (pruneflow.units.merged_layers: ``formula``), measure the cosine between the dense and the merged model's last
hidden states (each window's (tokens × hidden) flattened to one vector, averaged over ``windows`` calibration
windows); above ``threshold`` the merge is kept and the base steps down by ``interval``, otherwise by one; stop
below the ``lowest`` layer. Unlike the code, which runs to the bottom whatever the size, the merges stop at the
target ratio's block count (the last one folds fewer blocks so as not to pass it); when the threshold lets fewer
merges through, the plan removes less and says so. Forward passes only, on the model in memory; the model is left
as it was (scores carry the accepted merges).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from pruneflow.model import arch as A
from pruneflow.errors import PruneflowError
from pruneflow.methods.angular import blocks_for_ratio
from pruneflow.methods.options import LacoParams
from pruneflow.selection.scores import Scores
from pruneflow.units import merged_layers as M

log = logging.getLogger(__name__)


@contextmanager
def only_blocks(model: nn.Module, spec, blocks: list[nn.Module]):
    """The model runs with ``blocks`` as its block list (no KV cache is used)."""
    original = A.set_blocks(model, spec, nn.ModuleList(blocks))
    try:
        yield
    finally:
        A.set_blocks(model, spec, original)


@torch.no_grad()
def last_hidden(model: nn.Module, windows: torch.Tensor, device) -> list[torch.Tensor]:
    """Each window's last hidden states (after the final norm), flattened, in float32."""
    out = []
    for window in windows:
        states = model(input_ids=window[None].to(device), output_hidden_states=True, use_cache=False).hidden_states
        out.append(states[-1][0].float().flatten())
    return out


def similarity(model, spec, blocks, windows, dense: list[torch.Tensor], device) -> float:
    with only_blocks(model, spec, blocks):
        merged = last_hidden(model, windows, device)
    return float(torch.stack([F.cosine_similarity(a, b, dim=0) for a, b in zip(dense, merged)]).mean())


@torch.no_grad()
def score(model, spec, windows, runtime, ratio: float | None = None, config: LacoParams | None = None,
          **_) -> Scores:
    if ratio is None:
        raise PruneflowError("method laco needs the target ratio to know how many blocks to fold")
    config = config or LacoParams()
    target = blocks_for_ratio(model, spec, ratio)
    device = runtime.input_device(model)
    sample = windows[: config.windows]
    dense = last_hidden(model, sample, device)
    current = list(A.blocks(model, spec))
    originals: dict[int, list[torch.Tensor]] = {}  # id(block) → its projections before an accepted merge
    merges, sims, removed = [], [], 0
    base = max(config.lowest, len(current) - 1 - config.merge_layers)  # the code's start, in shallow models too
    try:
        while base >= config.lowest and removed < target:
            m = min(config.merge_layers - 1, len(current) - base - 1, target - removed)
            if m < 1:
                base -= 1
                continue
            group = current[base: base + m + 1]
            weights = M.merged(group, spec, config.formula)
            kept = [b.clone() for b in M.projections(group[0], spec)]
            M.write(group[0], spec, weights)
            candidate = current[:base + 1] + current[base + m + 1:]
            sim = similarity(model, spec, candidate, sample, dense, device)
            sims.append({"base": base, "m": m, "cosine": sim, "accepted": sim > config.threshold})
            if sim > config.threshold:
                originals.setdefault(id(group[0]), kept)
                current, removed = candidate, removed + m
                merges.append([base, m])
                base -= config.interval
                if base >= len(current):
                    base = len(current) - 1 - config.merge_layers
            else:
                M.write(group[0], spec, kept)
                base -= 1
    finally:  # the model is left as it was: the plan re-applies the merges
        for block in A.blocks(model, spec):
            if id(block) in originals:
                M.write(block, spec, originals[id(block)])
    if removed < target:
        log.warning("laco: merges above cosine %.2f fold %d of the %d blocks the ratio asks for (lower "
                    "score.laco.threshold to fold more)", config.threshold, removed, target)
    return Scores(heads=[], channels=[], comparable=True,
                  extra={"merges": torch.tensor(merges, dtype=torch.long).reshape(-1, 2),
                         "merge_formula": torch.tensor(M.FORMULAS.index(config.formula)), "trials": sims})
