"""Byte sizes as people write them (``512MiB``, ``20GiB``, ``1.5GB``); no torch, so params validation can use it."""

from __future__ import annotations

import math

from pruneflow.errors import PruneflowError

SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: str | int | None) -> int | None:
    """``512MiB``, ``20GiB``, ``1.5GB``, ``4096`` (bytes) → bytes; None stays None."""
    if value is None or isinstance(value, int):
        return value
    text = value.strip().lower().replace(" ", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number):]
    try:
        size = float(number) * SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise PruneflowError(f"size {value!r} is not a size; use e.g. 512MiB, 20GiB, 1.5GB or a number of "
                             f"bytes") from None
    if size <= 0:
        raise PruneflowError(f"size {value!r} must be positive")
    return int(size)


def format_size(size: int, up: bool = False) -> str:
    """``1.5 GiB``; with ``up``, rounded up (a minimum stays a minimum when it is read back)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            value = math.ceil(size / scale * 10) / 10 if up else size / scale
            return f"{value:.1f} {unit}"
    return f"{size} B"
