"""Where a model comes from: a local directory, or a Hugging Face hub id (``ORG/NAME``, optional ``@revision``).

Hub ids are resolved by huggingface_hub (its cache, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``; a
token only from the environment: ``HF_TOKEN`` or the one ``hf auth login`` stored). Only what pruneflow loads is
fetched: configs, safetensors weights (sharded or not) and tokenizer files — never pickles, never remote code.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pruneflow.data import packaged
from pruneflow.data.corpus import sha256_file
from pruneflow.errors import PruneflowError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(@(?P<revision>[\w./-]+))?$")
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
CONFIG_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken"]  # a dry run: configs and tokenizer, no weights


@dataclass(frozen=True)
class ModelSource:
    """A model as given (``name``) and the local directory that holds it."""

    name: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None  # as asked (None: the default branch)
    commit: str | None = None  # the snapshot the hub resolved it to

    @property
    def pinned(self) -> str:
        """The name that always means these files: ``ORG/NAME@<commit>`` for hub models, the path otherwise."""
        return f"{self.repo_id}@{self.commit}" if self.repo_id and self.commit else self.name


def resolve(name: str | Path, base: Path | None = None, weights: bool = True) -> ModelSource:
    """A local checkpoint directory (relative to ``base`` when given, else to the working directory), or a hub
    id resolved through the local cache (downloading when allowed; ``weights=False``: its configs and tokenizer
    only)."""
    text = str(name)
    path = Path(base or ".") / Path(text).expanduser()
    if text == packaged.REFERENCE and not path.exists():  # the default, outside a checkout: the shipped copy
        path = packaged.path(packaged.REFERENCE)
    if path.exists():
        if not path.is_dir():
            raise PruneflowError(f"checkpoint {text} is a file, not a directory")
        return ModelSource(name=text, path=path)
    match = HUB_ID.match(text)
    if match is None or text.startswith((".", "/", "~")):
        raise PruneflowError(f"checkpoint directory {text} does not exist (nor is it a hub id ORG/NAME[@REVISION])")
    return _from_hub(text, match["repo"], match["revision"], HUB_FILES if weights else CONFIG_FILES)


def _from_hub(name: str, repo_id: str, revision: str | None, files: list[str] = HUB_FILES) -> ModelSource:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    asked = f"{repo_id}@{revision}" if revision else repo_id
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=files)
    except GatedRepoError:
        raise PruneflowError(f"{repo_id} is a gated repository: accept its terms on the hub with your account, then "
                             f"set HF_TOKEN to a token of that account (read from the environment only)") from None
    except RevisionNotFoundError:
        raise PruneflowError(f"{repo_id} has no revision {revision!r} (a branch, tag or commit)") from None
    except RepositoryNotFoundError:
        raise PruneflowError(f"{name} is neither a local directory nor a model on the hub ({constants.ENDPOINT}); "
                             f"a private repository needs HF_TOKEN") from None
    except HFValidationError as err:
        raise PruneflowError(f"{name} is neither a local directory nor a valid hub id: {err}") from None
    except (LocalEntryNotFoundError, OSError) as err:
        raise PruneflowError(_not_cached(name, asked, repo_id, revision, err)) from None
    folder = Path(folder)
    return ModelSource(name=name, path=folder, repo_id=repo_id, revision=revision, commit=folder.name)


def _not_cached(name: str, asked: str, repo_id: str, revision: str | None, err: Exception) -> str:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(constants.HF_HUB_CACHE)
    repo_dir = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    offline = constants.HF_HUB_OFFLINE
    why = ("downloads are off (HF_HUB_OFFLINE=1)" if offline
           else f"the hub did not answer ({str(err).splitlines()[-1][:200]})")
    if repo_dir.is_dir():
        cached = sorted({p.name for folder in ("refs", "snapshots") for p in (repo_dir / folder).glob("*")})
        return (f"revision {revision or 'main'!r} of {repo_id} is not in the Hugging Face cache {cache} "
                f"(cached: {', '.join(cached) or 'nothing complete'}) and {why}")
    return (f"{name} is neither a local directory nor a model in the Hugging Face cache {cache}, and {why}; "
            f"download {asked} where the hub is reachable (`hf download {repo_id}`) or set HF_HUB_CACHE")


def fingerprint(source: ModelSource, cache_file: Path | None = None) -> dict:
    """What identifies a model's content, for the pipeline's first stage: the hub commit and each file's blob id
    (the cache names blobs by their sha256/git hash), or the sha256 of every file of a local directory (cached
    in ``cache_file`` by path, size, mtime and inode, so an unchanged directory is not read again)."""
    files = sorted(p for p in source.path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if source.repo_id:
        with _hashing([p for p in files if not p.is_symlink()]) as sha256:
            digests = {str(p.relative_to(source.path)): Path(os.path.realpath(p)).name if p.is_symlink()
                       else sha256(p) for p in files}
        return {"model": source.name, "repo_id": source.repo_id, "revision": source.revision,
                "commit": source.commit, "files": digests}
    known = _read_json(cache_file) if cache_file else {}
    digests, seen = {}, {}
    keys = {p: f"{p.resolve()}:{(st := p.stat()).st_size}:{st.st_mtime_ns}:{st.st_ino}" for p in files}
    with _hashing([p for p in files if keys[p] not in known]) as sha256:
        for p in files:
            digests[str(p.relative_to(source.path))] = seen[keys[p]] = known.get(keys[p]) or sha256(p)
    if cache_file and seen != known:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(seen, indent=0))
        os.replace(tmp, cache_file)
    return {"model": source.name, "files": digests}


@contextmanager
def _hashing(files: list[Path]):
    """``sha256_file`` with a progress bar over the bytes of ``files`` (those to be read: a 70B model's
    directory is 140 GB, minutes of reading the first time)."""
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, desc="fingerprinting the model (sha256)", unit="B", unit_scale=True, leave=False,
              disable=not files) as bar:
        def sha256(path: Path) -> str:
            digest = sha256_file(path)
            bar.update(path.stat().st_size)
            return digest

        yield sha256


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
