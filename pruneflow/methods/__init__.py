"""Importance scorers, one module per method. A new method is one module and one line here."""

from __future__ import annotations

from pruneflow.methods import angular, block_influence, bonsai, flap, magnitude, random_, sleb, taylor, wanda_sp

SCORERS = {
    "magnitude": magnitude.score,
    "random": random_.score,
    "wanda_sp": wanda_sp.score,
    "flap": flap.score,
    "taylor": taylor.score,
    "block_influence": block_influence.score,
    "angular": angular.score,
    "sleb": sleb.score,
    "bonsai": bonsai.score,
}

# Methods that score one iteration: prune.py repeats score → select → apply until the ratio is reached.
ITERATIVE = frozenset({"bonsai"})

# Methods that score whole blocks (use them with ``prune.units: [layers]``).
DEPTH_METHODS = frozenset({"block_influence", "angular", "sleb"})
# Methods scored with the next-token loss: causal LMs only.
CAUSAL_LM_ONLY = frozenset({"sleb", "taylor", "bonsai"})
