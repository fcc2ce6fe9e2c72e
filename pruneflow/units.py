"""The one vocabulary for what pruning removes.

Unit types — ``prune.units``, the fields of ``Scores``, a layer's widths, Bonsai's modules:
    heads      attention heads (query heads; with GQA, removed as ``head_mode`` says)
    channels   MLP intermediate channels (one row of gate/up and one column of down each)
    layers     whole decoder blocks
    hidden     channels of the hidden (embedding) dimension every block shares: one column of the embedding,
               of every projection reading the residual stream and of the head, one row of o/down, one entry of
               every norm (Minitron); pruned on its own, the same channels everywhere
Head modes — ``prune.head_mode``, how GQA heads are removed so every KV group keeps the same size:
    query      one query head from every KV group of a layer at a time
    group      one whole KV group (its KV head and its query heads) at a time
    auto       whichever of the two removes fewer parameters per step
Selection units — what ``plan.select`` ranks and removes, one of: a ``channel``, a ``query`` step, a
``group``, a ``layer``.
"""

UNIT_TYPES = ("heads", "channels", "layers", "hidden", "experts")
WIDTH_UNITS = ("heads", "channels")
HEAD_MODES = ("auto", "query", "group")
ALLOCATIONS = ("uniform", "global", "search")  # search: pruneflow.search, from the method's own plan
# what replaces the removed units' contribution (prune.reconstruct): nothing, their mean as a bias (FLAP), or a
# least-squares re-fit of the kept input columns of o_proj/down_proj (pruneflow.reconstruct)
RECONSTRUCTIONS = ("none", "bias", "lstsq")
ALIASES = {"mlp": "channels"}  # the name params files used before; still read
