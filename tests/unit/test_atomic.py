"""pruneflow.atomic: a directory written all at once gets the permissions of any directory the user makes; a file
output is checked before any work."""

import os
from pathlib import Path

import pytest

from pruneflow.atomic import atomic_dir
from pruneflow.errors import PruneflowError


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_an_output_directory_has_the_permissions_mkdir_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        plain = tmp_path / "plain"
        plain.mkdir()
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "model.safetensors").write_bytes(b"weights")
        replaced = tmp_path / "out"
        with atomic_dir(replaced, overwrite=True) as tmp:  # the swap keeps them too
            (tmp / "model.safetensors").write_bytes(b"new weights")
    finally:
        os.umask(old)
    mode = lambda path: path.stat().st_mode & 0o777  # noqa: E731
    assert mode(replaced) == mode(plain) == 0o777 & ~umask
    assert (replaced / "model.safetensors").read_bytes() == b"new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plain"]  # no temporary directory left


def test_an_existing_output_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    with pytest.raises(PruneflowError, match="already exists"):
        with atomic_dir(out):
            pass
    assert (out / "mine.txt").read_text() == "mine"


def test_a_file_output_is_never_a_directory_and_replaces_a_file_only_when_forced(tmp_path):
    from pruneflow.atomic import check_output_file

    (tmp_path / "mine").mkdir()
    for overwrite in (False, True):  # the directory is named first: --force would not help
        with pytest.raises(PruneflowError, match="is a directory; give a file name such as model.gguf"):
            check_output_file(tmp_path / "mine", overwrite)
    (tmp_path / "model.gguf").write_bytes(b"gguf")
    with pytest.raises(PruneflowError, match="already exists; choose another or pass --force"):
        check_output_file(tmp_path / "model.gguf", overwrite=False)
    check_output_file(tmp_path / "model.gguf", overwrite=True)
    check_output_file(tmp_path / "new.gguf", overwrite=False)


def test_an_output_under_a_file_or_where_nothing_can_be_made_is_refused_before_any_work(tmp_path):
    """`export gguf M afile/x.gguf` ended in a FileExistsError traceback after the export; `export onnx M
    /dev/null/x` said only 'File exists'."""
    from pruneflow.atomic import check_output_dir, check_output_file

    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    for check in (check_output_file, check_output_dir):
        with pytest.raises(PruneflowError, match=f"cannot write {blocker}/sub/out: {blocker} is a file, not a "
                                                 "writable directory"):
            check(blocker / "sub" / "out", False)
        # /proc takes no new entry, whoever asks (os.access says yes to root: it is tried)
        with pytest.raises(PruneflowError, match="cannot write /proc/pruneflow/out: /proc is not a writable "
                                                 "directory"):
            check(Path("/proc/pruneflow/out"), False)
    with pytest.raises(PruneflowError, match="is a file, not a writable directory"):
        with atomic_dir(blocker / "out"):
            pass
    assert blocker.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    check_output_dir(tmp_path / "new" / "deeper", False)  # a location that can be made is fine
    assert not (tmp_path / "new").exists()  # and checking it made nothing
