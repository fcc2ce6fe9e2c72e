"""Text and the embedded model: what calibration, evaluation and the demo read.

Owns the packaged public-text corpus (``corpus``), where the shipped folders are in a checkout or a wheel
(``packaged``), seeded calibration windows with their manifest (``calibration``) and the small reference model
trained here on that corpus (``reference``). May import ``pruneflow.errors``/``atomic`` and, for the reference
model's perplexity, evaluation; nothing of pruning. This file imports nothing.
"""
