"""Local lm-eval tasks from the held-out split: deterministic, offline (no socket), accuracy for any model."""

import json
import socket

import pytest

from pruneflow.model import checkpoint

from pruneflow.data import corpus
from pruneflow.errors import PruneflowError
from pruneflow.evaluation.lm_tasks import LOCAL_TASKS, build_tasks, evaluate_tasks, task_manager


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, tiny_tokenizer):
    # sentences that fit the tiny model's 128 positions with its 300-token vocabulary
    return build_tasks(tmp_path_factory.mktemp("lm_tasks"), corpus.load_split("test")[:400], n_examples=40,
                       tokenizer=tiny_tokenizer, max_tokens=128)


def test_tasks_are_deterministic_and_well_formed(task_dir, tmp_path, tiny_tokenizer):
    again = build_tasks(tmp_path, corpus.load_split("test")[:400], n_examples=40, tokenizer=tiny_tokenizer,
                        max_tokens=128)
    for name in LOCAL_TASKS:
        assert (task_dir / f"{name}.jsonl").read_text() == (again / f"{name}.jsonl").read_text()
        rows = [json.loads(line) for line in (task_dir / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 40 and all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 for r in rows)
        assert len({r["label"] for r in rows}) > 1  # the answer is not always in one place
    for row in (json.loads(line) for line in (task_dir / "pruneflow_word_order.jsonl").read_text().splitlines()):
        original = row["choices"][row["label"]]
        assert all(sorted(c.split()) == sorted(original.split()) for c in row["choices"])  # same words


def test_local_tasks_run_offline_on_dense_and_pruned_models(task_dir, tiny_checkpoint, monkeypatch):
    import torch

    from pruneflow.pipeline.params import PruneParams
    from pruneflow.prune import prune

    dense, tokenizer, spec = checkpoint.load(tiny_checkpoint)
    pruned, _, _ = checkpoint.load(tiny_checkpoint)
    windows = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    prune(pruned, spec, "wanda_sp", PruneParams(ratio=0.3, allocation="global"), windows)

    def no_network(*args, **kwargs):
        raise AssertionError(f"a socket was opened: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    manager = task_manager(task_dir, list(LOCAL_TASKS))
    for model in (dense, pruned):
        out = evaluate_tasks(model, tokenizer, list(LOCAL_TASKS), manager, batch_size=8)
        assert set(out["scores"]) == set(LOCAL_TASKS)
        assert all(0.0 <= v <= 1.0 for v in out["scores"].values())
        assert "acc_mutual_info" in out["results"]["pruneflow_next_sentence"]
        assert set(out["versions"]) >= set(LOCAL_TASKS) and out["configs"]["pruneflow_word_order"]["output_type"]


def test_the_reference_model_beats_chance_on_word_order(task_dir):
    model, tokenizer, _ = checkpoint.load("models/reference")
    out = evaluate_tasks(model, tokenizer, ["pruneflow_word_order"], task_manager(task_dir, ["pruneflow_word_order"]))
    assert out["scores"]["pruneflow_word_order"] > 0.5  # chance is 0.25


def test_an_unknown_task_name_is_a_clear_error(task_dir):
    with pytest.raises(PruneflowError, match="unknown lm-eval task.*no_such_task"):
        task_manager(task_dir, ["pruneflow_word_order", "no_such_task"])
