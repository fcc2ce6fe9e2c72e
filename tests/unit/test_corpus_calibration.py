import hashlib
import gzip
import json

import pytest
import torch

from pruneflow.data import calibration as C
from pruneflow.data import corpus
from pruneflow.errors import PruneflowError


def test_brown_tags_are_stripped_and_spacing_restored():
    tagged = "\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, didn't/dod* it/pps ?/.\n"
    assert corpus.detag_brown(tagged) == 'The jury said "no evidence", didn\'t it?'


def test_split_is_a_deterministic_function_of_the_id():
    assert corpus.split_of("wiki:Alan Turing") == corpus.split_of("wiki:Alan Turing")
    counts = {s: 0 for s in corpus.SPLITS}
    for i in range(2000):
        counts[corpus.split_of(f"doc{i}")] += 1
    assert 1700 < counts["train"] < 1900 and counts["validation"] > 50 and counts["test"] > 50


def test_committed_splits_match_their_manifest():
    manifest = json.loads((corpus.CORPUS_DIR / "MANIFEST.json").read_text())
    for split, entry in manifest["splits"].items():
        payload = gzip.open(corpus.CORPUS_DIR / f"{split}.jsonl.gz").read()
        assert hashlib.sha256(payload).hexdigest() == entry["sha256"]
        assert len(corpus.load_split(split)) == entry["documents"]


def test_calibration_windows_are_seeded(tiny_tokenizer):
    a, manifest = C.prepare(tiny_tokenizer, "corpus:validation", 4, 32, seed=3)
    b, _ = C.prepare(tiny_tokenizer, "corpus:validation", 4, 32, seed=3)
    c, _ = C.prepare(tiny_tokenizer, "corpus:validation", 4, 32, seed=4)
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert manifest.source_digest.startswith("corpus:validation:")


def test_calibration_from_local_files(tiny_tokenizer, tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": "some calibration text " * 20}) for _ in range(3)))
    windows, manifest = C.prepare(tiny_tokenizer, str(jsonl), 2, 16, seed=0)
    assert windows.shape == (2, 16)
    assert manifest.source_digest == hashlib.sha256(jsonl.read_bytes()).hexdigest()


@pytest.mark.parametrize("content,message", [
    (None, "calibration source .* not found"),
    ("", "has 0 tokens, fewer than one 64-token window"),
    ("too short", "fewer than one 64-token window"),
])
def test_bad_calibration_sources(tiny_tokenizer, tmp_path, content, message):
    path = tmp_path / "calib.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PruneflowError, match=message):
        C.prepare(tiny_tokenizer, str(path), 2, 64, seed=0)


def test_bad_jsonl_line_is_named(tiny_tokenizer, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(PruneflowError, match=r"c.jsonl:2: expected a JSON object with a 'text' field"):
        C.prepare(tiny_tokenizer, str(path), 2, 8, seed=0)


def test_seqlen_above_max_positions(tiny_tokenizer):
    with pytest.raises(PruneflowError, match="exceeds the model's max positions"):
        C.prepare(tiny_tokenizer, "corpus:validation", 2, 512, seed=0, max_positions=128)


def test_datasets_source_without_the_package_is_a_clear_error(tiny_tokenizer):
    import importlib.util

    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("datasets is installed here; the offline-hub case is covered by its own error")
    with pytest.raises(PruneflowError, match="needs the `datasets` package"):
        C.prepare(tiny_tokenizer, "hf:wikitext:wikitext-2-raw-v1", 2, 16, seed=0)
