"""Control baseline: seeded uniform random scores."""

from __future__ import annotations

import torch

from pruneflow.model import arch as A
from pruneflow.selection.scores import Scores


def score(model, spec, windows=None, seed: int = 0, **_) -> Scores:
    gen = torch.Generator().manual_seed(seed)
    widths = A.layer_widths(model, spec)
    return Scores(heads=[torch.rand(w["heads"], generator=gen) for w in widths],
                  channels=[torch.rand(w["experts"], w["channels"], generator=gen) if "experts" in w
                            else torch.rand(w["channels"], generator=gen) for w in widths])
