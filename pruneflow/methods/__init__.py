"""Importance scorers, one module per method. A new method is one module and one line here."""

from __future__ import annotations

from pruneflow.methods import flap, magnitude, random_, wanda_sp

SCORERS = {
    "magnitude": magnitude.score,
    "random": random_.score,
    "wanda_sp": wanda_sp.score,
    "flap": flap.score,
}
