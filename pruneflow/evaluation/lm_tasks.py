"""Zero-shot task accuracy with lm-eval on an in-memory model, and offline tasks made from the held-out text.

Standard lm-eval task names (boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, ...) pass
through unchanged and run wherever their datasets are available. Offline, two local tasks are generated
deterministically from held-out documents (the packaged corpus's test split) as lm-eval YAML + JSONL:

- ``pruneflow_word_order``: the original sentence among three copies that each swap one pair of neighbouring
  words (same words, so the choice measures syntax, not vocabulary); metric ``acc``.
- ``pruneflow_next_sentence``: a sentence, then its true successor among three sentences of other documents,
  scored against each choice's unconditional likelihood (lm-eval's ``acc_mutual_info``), so a choice that is
  merely likely text does not win.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import yaml

from pruneflow.errors import PruneflowError

WORD_ORDER, NEXT_SENTENCE = "pruneflow_word_order", "pruneflow_next_sentence"
LOCAL_TASKS = (WORD_ORDER, NEXT_SENTENCE)
HEADLINE = {WORD_ORDER: "acc", NEXT_SENTENCE: "acc_mutual_info"}  # the number gates and tables use
CHOICES = 4


def sentences(document: str, min_words: int = 6, max_words: int = 30) -> list[str]:
    """A document's sentences of ``min_words``..``max_words`` words, in order."""
    parts = re.split(r"(?<=[.!?])\s+", document.strip())
    return [p for p in parts if min_words <= len(p.split()) <= max_words and p[-1:] in ".!?"]


def _word_order(docs: list[list[str]], n: int, rng: random.Random) -> list[dict]:
    rows = []
    for sentence in (s for doc in docs for s in doc):
        words = sentence.split()
        # each distractor swaps one pair of neighbouring words (different pairs): whole-sentence shuffles are
        # too easy to tell apart (a 7.9M-parameter model scores 0.995 on them), one swap is not
        swaps = [i for i in range(len(words) - 1) if words[i] != words[i + 1]]
        if len(swaps) < CHOICES - 1:
            continue
        distractors = []
        for i in rng.sample(swaps, CHOICES - 1):
            swapped = words[:i] + [words[i + 1], words[i]] + words[i + 2:]
            distractors.append(" ".join(swapped))
        choices = [sentence, *distractors]
        rng.shuffle(choices)
        rows.append({"context": "", "choices": choices, "label": choices.index(sentence)})
        if len(rows) == n:
            break
    return rows


def _next_sentence(docs: list[list[str]], n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i, doc in enumerate(docs):
        if len(doc) < 2:
            continue
        others = [s for j, d in enumerate(docs) if j != i for s in d]
        distractors = rng.sample(others, CHOICES - 1)
        choices = [doc[1], *distractors]
        rng.shuffle(choices)
        rows.append({"context": doc[0], "choices": choices, "label": choices.index(doc[1])})
        if len(rows) == n:
            break
    return rows


def _task_yaml(name: str, data_file: Path, metrics: list[str]) -> dict:
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
            "metadata": {"version": 1.0}}


def build_tasks(out_dir: Path, documents: list[str], n_examples: int = 200, seed: int = 0, tokenizer=None,
                max_tokens: int | None = None) -> Path:
    """Write the local tasks (YAML + JSONL, absolute paths) into ``out_dir``; same inputs, same files.

    With ``tokenizer`` and ``max_tokens``, sentences longer than half the model's context are left out, so a
    context and a choice always fit (lm-eval refuses a continuation longer than the context window).
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = [s for s in (sentences(d) for d in documents) if s]
    if tokenizer is not None and max_tokens:
        limit = max_tokens // 2 - 2
        docs = [kept for kept in ([s for s in doc if len(tokenizer(s)["input_ids"]) <= limit] for doc in docs) if kept]
    made = {WORD_ORDER: (_word_order(docs, n_examples, random.Random(seed)), ["acc"]),
            NEXT_SENTENCE: (_next_sentence(docs, n_examples, random.Random(seed + 1)), ["acc", "acc_mutual_info"])}
    for name, (rows, metrics) in made.items():
        if len(rows) < min(n_examples, 20):
            raise PruneflowError(f"held-out text yields only {len(rows)} examples for {name}")
        data = out_dir / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(_task_yaml(name, data, metrics), sort_keys=False))
    return out_dir


def task_manager(task_dir: Path, names: list[str]):
    """An lm-eval TaskManager with the local tasks (and lm-eval's own only when a standard name is asked)."""
    from lm_eval.tasks import TaskManager

    standard = [n for n in names if n not in LOCAL_TASKS]
    manager = TaskManager(include_path=str(task_dir), include_defaults=bool(standard))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise PruneflowError(f"evaluate.tasks: unknown lm-eval task(s) {', '.join(unknown)}; local tasks: "
                             f"{', '.join(LOCAL_TASKS)}, or a task name lm-eval knows (e.g. arc_easy)")
    return manager


def evaluate_tasks(model, tokenizer, names: list[str], manager, batch_size: int = 16,
                   limit: int | None = None, seed: int = 0) -> dict:
    """lm-eval on the in-memory model: {"scores": {task: headline}, "results", "versions", "configs"}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              max_length=getattr(model.config, "max_position_embeddings", None))
    out = simple_evaluate(model=lm, tasks=list(names), task_manager=manager, limit=limit, log_samples=False,
                          bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed)
    results = {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float))}
               for task, metrics in out["results"].items()}
    scores = {task: results[task].get(HEADLINE.get(task, "acc")) for task in names if task in results}
    return {"scores": scores, "results": results, "versions": out.get("versions", {}),
            "configs": out.get("configs", {})}
