"""Write a directory all at once: into a sibling temp dir, renamed into place only when complete."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pruneflow.errors import PruneflowError


@contextmanager
def atomic_dir(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir to fill; on success it replaces ``out_dir``, on any failure it is removed.

    An existing ``out_dir`` is refused unless ``overwrite``; it is swapped out only after the new one is complete.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise PruneflowError(f"output directory {out_dir} already exists; choose another or pass --force")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
