"""pruneflow: structured pruning of LLMs into genuinely smaller, loadable checkpoints."""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, with_tokenizer: bool = True):
    """Load a checkpoint pruneflow wrote (vanilla or per-layer widths) without remote code.

    Returns ``(model, tokenizer, arch_spec)``. Imported lazily so ``import pruneflow`` stays cheap.
    """
    from pruneflow.model.checkpoint import load as _load

    return _load(path, with_tokenizer=with_tokenizer)
