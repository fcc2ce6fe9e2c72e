"""evaluate.source / `pruneflow evaluate --text`: the packaged corpus, a local file, or a `datasets` dataset
(`hf:NAME[:CONFIG][:SPLIT]`) read offline from a real HF datasets cache layout, with the field's protocol."""

import socket

import pytest

from tests.pipeline.test_cli import run

ROWS = {"test": [" = Valkyria Chronicles = \n", "", " Senjō no Valkyria is a tactical role @-@ playing game .\n",
                 " It was released in January 2011 in Japan .\n", "", " = = Gameplay = = \n"] * 12,
        "train": [" = Robert Boulter = \n", " Robert Boulter is an English film actor .\n"] * 12}


def datasets_cache(root, name="wikitext", config="wikitext-2-raw-v1", rows=ROWS):
    """A dataset as `load_dataset(name, config)` leaves it in HF_DATASETS_CACHE once downloaded:
    ``NAME/CONFIG/VERSION/COMMIT/`` with dataset_info.json and one Arrow file per split (written by datasets'
    own parquet builder from local parquet files, then put under the config's name as a hub download is)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = {}
    for split, texts in rows.items():
        files[split] = str(root / f"{split}.parquet")
        pq.write_table(pa.table({"text": texts}), files[split])
    commit = "9f3b1a0c" * 5
    builder = Parquet(cache_dir=str(root / "build"), dataset_name=name, config_name=config, data_files=files,
                      hash=commit)
    builder.download_and_prepare()
    (built,) = (root / "build" / name).glob(f"{config}-*")
    cache = root / "datasets"
    shutil.copytree(built, cache / name / config)
    return cache


@pytest.fixture
def offline_wikitext(tmp_path, monkeypatch):
    import datasets

    cache = datasets_cache(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return cache


def test_wikitext_perplexity_follows_the_fields_protocol(tiny_checkpoint, offline_wikitext):
    """The test split's rows joined by blank lines, tokenized once, non-overlapping windows of the context
    length: the same number as evaluate.perplexity on that stream, computed by hand here."""
    from pruneflow.model import checkpoint
    from pruneflow.evaluation.evaluate import evaluate_dirs, perplexity
    from pruneflow.pipeline.params import EvaluateParams

    ev = EvaluateParams(source="hf:wikitext:wikitext-2-raw-v1:test", ppl_seqlen=32, speed=False, tasks=[])
    rows = evaluate_dirs({"m": tiny_checkpoint}, ev)
    model, tokenizer, _ = checkpoint.load(tiny_checkpoint)
    ids = tokenizer("\n\n".join(ROWS["test"]))["input_ids"]
    import torch

    expected = perplexity(model, torch.tensor(ids), 32)
    assert rows["m"]["test_ppl"] == pytest.approx(expected, rel=1e-9)
    assert rows["m"]["ppl_windows"] == len(ids) // 32
    train = evaluate_dirs({"m": tiny_checkpoint}, ev.model_copy(update={"source": "hf:wikitext:wikitext-2-raw-v1:train"}))
    assert train["m"]["test_ppl"] != rows["m"]["test_ppl"]  # the split named is the split read


def test_the_cli_evaluates_on_a_dataset_or_a_file(tiny_checkpoint, offline_wikitext, tmp_path):
    result = run("evaluate", tiny_checkpoint, "--text", "hf:wikitext:wikitext-2-raw-v1", "--seqlen", 32,
                 "--no-speed")
    assert result.exit_code == 0, result.output
    assert "perplexity on hf:wikitext:wikitext-2-raw-v1, 32-token windows" in result.output
    text = tmp_path / "held.txt"
    text.write_text("\n\n".join(r for r in ROWS["test"] if r.strip()))
    from_file = run("evaluate", tiny_checkpoint, "--text", text, "--seqlen", 16, "--no-speed")
    assert from_file.exit_code == 0, from_file.output
    assert f"perplexity on {text}, 16-token windows" in from_file.output


@pytest.mark.parametrize("source, message", [
    ("hf:wikitext:wikitext-103-raw-v1:test", "dataset 'hf:wikitext:wikitext-103-raw-v1:test' is not available"),
    ("hf:", "expected hf:NAME[:CONFIG][:SPLIT]"),
    ("hf:wikitext:a:b:c", "expected hf:NAME[:CONFIG][:SPLIT]"),
    ("no/such/file.txt", "evaluation text 'no/such/file.txt' not found"),
])
def test_an_unavailable_or_malformed_text_fails_before_any_model_loads(tiny_checkpoint, offline_wikitext, source,
                                                                        message, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        result = run("evaluate", tiny_checkpoint, "--text", source, "--seqlen", 32, "--no-speed")
    assert result.exit_code == 2 and message in result.output, result.output
    assert not any("evaluating" in r.getMessage() for r in caplog.records)  # no model was loaded


def test_what_any_listed_model_cannot_take_is_refused_before_the_first_is_measured(tiny_checkpoint, tmp_path,
                                                                                   caplog):
    """The last model's type (a nemotron-nas export, written for vLLM) and a window past a model's positions."""
    import json
    import logging
    import shutil

    deci = tmp_path / "vllm"
    shutil.copytree(tiny_checkpoint, deci)
    config = json.loads((deci / "config.json").read_text())
    (deci / "config.json").write_text(json.dumps({**config, "model_type": "nemotron-nas"}))
    cases = [((tiny_checkpoint, deci), "unsupported model type 'nemotron-nas' (pruneflow writes it for vLLM"),
             ((tiny_checkpoint, "--seqlen", config["max_position_embeddings"] + 1),
              f"evaluate.ppl_seqlen {config['max_position_embeddings'] + 1} exceeds")]
    for args, message in cases:
        with caplog.at_level(logging.INFO):
            result = run("evaluate", *args, "--no-speed", "--max-windows", 2)
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
        assert not any("evaluating" in r.getMessage() for r in caplog.records)  # no model was loaded
