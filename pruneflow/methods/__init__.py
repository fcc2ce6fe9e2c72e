"""Importance scorers, one module per method. A new method is one module and one line here."""

from __future__ import annotations

import importlib

# method name → the module of this package whose ``score`` it is
METHODS = {
    "magnitude": "magnitude",
    "random": "random_",
    "wanda_sp": "wanda_sp",
    "flap": "flap",
    "taylor": "taylor",
    "block_influence": "block_influence",
    "angular": "angular",
    "sleb": "sleb",
    "bonsai": "bonsai",
}


def __getattr__(name: str):
    # SCORERS (name → score function) imports the method modules, and with them torch and transformers, on
    # first use only: validating params (pruneflow run, the Prefect UI) needs just the names
    if name == "SCORERS":
        scorers = {method: importlib.import_module(f"{__name__}.{module}").score for method, module in METHODS.items()}
        globals()["SCORERS"] = scorers
        return scorers
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Methods that score one iteration: prune.py repeats score → select → apply until the ratio is reached.
ITERATIVE = frozenset({"bonsai"})

# Methods that score whole blocks (use them with ``prune.units: [layers]``).
DEPTH_METHODS = frozenset({"block_influence", "angular", "sleb"})
# Methods scored with the next-token loss: causal LMs only.
CAUSAL_LM_ONLY = frozenset({"sleb", "taylor", "bonsai"})
