"""Calibration data: N seeded windows of ``seqlen`` tokens from a named text source, with a manifest.

Sources: ``corpus`` (the packaged corpus, train split; ``corpus:validation`` etc. for another split), a local
``.txt`` file (blank lines separate documents) or ``.jsonl`` file (a ``text`` field per line), or
``hf:NAME[:CONFIG][:SPLIT]`` for a ``datasets`` dataset (its cache, ``HF_DATASETS_OFFLINE``; train split unless
named). :func:`held_out` reads the same sources for evaluation (test split by default).
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pruneflow.data import corpus
from pruneflow.data.corpus import parse_hf
from pruneflow.atomic import atomic_dir
from pruneflow.errors import PruneflowError


@dataclass(frozen=True)
class CalibrationManifest:
    source: str
    source_digest: str
    n_windows: int
    seqlen: int
    seed: int
    stream_tokens: int
    tokenizer_digest: str


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            docs.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise PruneflowError(f"{path}:{number}: expected a JSON object with a 'text' field ({err})") from err
    return docs


def check_source(source: str, what: str = "calibration source", base: Path | None = None) -> None:
    """What can be refused of a text source without reading it (a missing file, hf: without ``datasets``), so
    that a command refuses it before it loads the model. ``base``: what a relative file is relative to (the
    directory the source will be read in; default the current one)."""
    if source == "corpus" or source.startswith("corpus:"):
        return
    if source.startswith("hf:"):
        parse_hf(source)
        try:
            import datasets  # noqa: F401
        except ImportError as err:
            raise PruneflowError(f"{what} hf:... needs the `datasets` package") from err
    elif not (path := Path(base or ".") / source).is_file():
        shown = source if base is None else str(path)
        raise PruneflowError(f"{what} {shown!r} not found (expected 'corpus', a .txt/.jsonl file "
                             f"or hf:NAME[:CONFIG][:SPLIT])")


def check_seqlen(seqlen: int, max_positions: int | None, what: str = "calibration seqlen",
                 model: str = "the model's") -> None:
    """Windows no longer than the model's positions (``max_position_embeddings``; None: no limit known)."""
    if max_positions is not None and seqlen > max_positions:
        raise PruneflowError(f"{what} {seqlen} exceeds {model} max positions ({max_positions})")


def read_source(source: str, split: str = "train", what: str = "calibration source") -> tuple[list[str], str]:
    """The documents of a text source and a digest identifying their content (``split``: the corpus's or the
    dataset's split when the source names none; ``what``: the source's role, for errors)."""
    check_source(source, what)
    if source == "corpus" or source.startswith("corpus:"):
        split = source.partition(":")[2] or split
        try:
            return corpus.load_split(split), f"corpus:{split}:{corpus.digest()}"
        except corpus.CorpusError as err:
            raise PruneflowError(str(err)) from err
    if source.startswith("hf:"):
        return _read_datasets(source, split)
    path = Path(source)
    if path.suffix == ".jsonl":
        docs = _read_jsonl(path)
    else:
        docs = [d for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    return docs, hashlib.sha256(path.read_bytes()).hexdigest()


def _read_datasets(source: str, split: str) -> tuple[list[str], str]:
    import datasets

    name, config, asked = parse_hf(source)
    try:
        data = datasets.load_dataset(name, config, split=asked or split)
    except Exception as err:  # datasets raises many types for "not available offline"
        raise PruneflowError(f"dataset {source!r} is not available: {str(err).splitlines()[0][:300]}") from err
    if "text" not in data.column_names:
        raise PruneflowError(f"dataset {source!r} has no 'text' column (columns: {', '.join(data.column_names)})")
    return list(data["text"]), f"{source}:{asked or split}:{data._fingerprint}"


def token_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """Documents tokenized and joined by the EOS (or SEP) token into one 1-D stream."""
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids = array("q")  # 8 bytes a token (a list of Python ints takes ~36): the train split is millions of tokens
    for start in range(0, len(documents), 256):
        batch = tokenizer(documents[start:start + 256], add_special_tokens=False, verbose=False)["input_ids"]
        for doc in batch:
            ids.extend(doc)
            if separator is not None:
                ids.append(separator)
    return torch.frombuffer(ids, dtype=torch.long).clone() if ids else torch.empty(0, dtype=torch.long)


HELD_OUT = "evaluation text"


def held_out(tokenizer, source: str = "corpus", read: tuple[list[str], str] | None = None) -> torch.Tensor:
    """The evaluation token stream of ``source`` (test split unless it names one).

    ``corpus`` and files: documents joined by EOS, as calibration reads them. ``hf:...``: the field's protocol
    for WikiText-2 / C4 perplexity (SparseGPT's, Wanda's and FLAP's evaluation code): the split's ``text`` rows
    joined by blank lines and tokenized as one string (with the tokenizer's own special tokens, e.g. BOS); the
    windows are then cut from it as from any stream (``evaluate.ppl_seqlen`` tokens, non-overlapping).
    ``read``: what ``read_source(source, split="test")`` returned, when the caller read it already."""
    documents, _ = read or read_source(source, split="test", what=HELD_OUT)
    if source.startswith("hf:"):
        text = "\n\n".join(documents)
        return torch.tensor(tokenizer(text, verbose=False)["input_ids"] if text else [], dtype=torch.long)
    return token_stream(tokenizer, [d for d in documents if d])


def describe_held_out(source: str) -> dict:
    """What identifies an evaluation text (recorded beside the perplexities it produced)."""
    _, digest = read_source(source, split="test", what=HELD_OUT)
    return {"source": source, "digest": digest,
            "protocol": "rows joined by blank lines, one tokenization" if source.startswith("hf:")
            else "documents joined by EOS"}


def tokenizer_digest(tokenizer) -> str:
    return hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()[:16]


def prepare(tokenizer, source: str, n_windows: int, seqlen: int, seed: int,
            max_positions: int | None = None) -> tuple[torch.Tensor, CalibrationManifest]:
    """``(n_windows, seqlen)`` token windows at seeded random offsets of the source's token stream."""
    if n_windows < 1 or seqlen < 2:
        raise PruneflowError(f"calibration needs n_windows >= 1 and seqlen >= 2, got {n_windows}, {seqlen}")
    check_seqlen(seqlen, max_positions)
    documents, digest = read_source(source)
    stream = token_stream(tokenizer, [d for d in documents if d])
    if len(stream) < seqlen:
        raise PruneflowError(f"calibration source {source!r} has {len(stream)} tokens, fewer than one "
                             f"{seqlen}-token window")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seqlen + 1, (n_windows,), generator=gen)
    windows = torch.stack([stream[s:s + seqlen] for s in starts.tolist()])
    manifest = CalibrationManifest(source=source, source_digest=digest, n_windows=n_windows, seqlen=seqlen,
                                   seed=seed, stream_tokens=len(stream), tokenizer_digest=tokenizer_digest(tokenizer))
    return windows, manifest


def save(windows: torch.Tensor, manifest: CalibrationManifest, out_dir: Path, overwrite: bool = False) -> None:
    """Write windows + manifest to a temp dir renamed to ``out_dir`` at the end."""
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file({"input_ids": windows.contiguous()}, tmp / "calibration.safetensors")
        (tmp / "manifest.json").write_text(json.dumps(asdict(manifest), indent=1) + "\n")


def load(out_dir: Path) -> tuple[torch.Tensor, CalibrationManifest]:
    manifest = CalibrationManifest(**json.loads((out_dir / "manifest.json").read_text()))
    return load_file(out_dir / "calibration.safetensors")["input_ids"], manifest
