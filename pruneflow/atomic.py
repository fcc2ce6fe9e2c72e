"""Write a directory all at once: into a sibling temp dir, renamed into place only when complete."""

from __future__ import annotations

import os
import secrets
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
    check_output_dir(out_dir, overwrite)
    old = out_dir.with_name(f".{out_dir.name}.old")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(out_dir)
        if old.exists() and not out_dir.exists():  # a swap was killed between its two renames
            old.rename(out_dir)
        tmp = _fresh_dir(out_dir)
    except OSError as err:
        raise PruneflowError(f"cannot write {out_dir}: {err.strerror or err}") from err
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except OSError as err:  # disk full, permissions, …: nothing was written, say so plainly
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            old.rename(out_dir)  # the previous output stays
        raise PruneflowError(f"writing {out_dir} failed ({err.strerror or err}); nothing was written") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_file(out: Path, overwrite: bool, example: str = "model.gguf") -> None:
    """A file output may be written: not a directory (whatever ``--force`` says), not an existing file unless
    ``overwrite``."""
    if out.is_dir():
        raise PruneflowError(f"output {out} is a directory; give a file name such as {example}")
    if out.exists() and not overwrite:
        raise PruneflowError(f"output file {out} already exists; choose another or pass --force")
    check_output_location(out)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """A directory output may be written: not existing unless ``overwrite``, and its location writable."""
    if out.exists() and not overwrite:
        raise PruneflowError(f"output directory {out} already exists; choose another or pass --force")
    check_output_location(out)


def check_output_location(out: Path) -> None:
    """``out`` can be created: its nearest existing ancestor is a directory this process can create entries in
    (tried: ``os.access`` says yes to root everywhere). Checked before any work, not when writing."""
    parent = Path(out).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PruneflowError(f"cannot write {out}: {parent} is a file, not a writable directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".pruneflow-probe-", dir=parent))
    except OSError as err:
        raise PruneflowError(f"cannot write {out}: {parent} is not a writable directory ({err.strerror})") from None


def _fresh_dir(out_dir: Path) -> Path:
    """A new sibling ``.NAME.PID.XXXXXXXX`` with the permissions ``mkdir`` gives under the umask: the output is
    this directory renamed (``tempfile.mkdtemp``'s 0700 would keep it from a server or a teammate)."""
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.{secrets.token_hex(4)}")
    tmp.mkdir()
    return tmp


def _remove_abandoned(out_dir: Path) -> None:
    """Temp dirs of ``out_dir`` left by a process that was killed (its pid, in the name, is gone)."""
    for sibling in out_dir.parent.glob(f".{out_dir.name}.*.*"):
        pid = sibling.name[len(out_dir.name) + 2:].split(".")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Does a process with this pid exist (ours or not)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
