"""Evaluation basics: perplexity (one pinned protocol), sizes, speed, encoder fidelity."""

from __future__ import annotations

import logging
import math

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

PPL_SEQLEN = 256


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seqlen: int = PPL_SEQLEN, batch_size: int = 8,
               max_windows: int | None = None) -> float:
    """Perplexity over non-overlapping ``seqlen``-token windows of a 1-D token stream.

    The pinned protocol: the held-out text is one stream (documents joined by EOS), cut into
    consecutive windows of exactly ``seqlen`` tokens (the tail shorter than a window is dropped); every
    token but each window's first is predicted; the result is exp of the mean NLL over all of them.
    """
    n_windows = len(token_ids) // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"held-out text has {len(token_ids)} tokens, fewer than one {seqlen}-token window")
    windows = token_ids[: n_windows * seqlen].view(n_windows, seqlen)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", unit="batch", leave=False):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def size_on_disk(checkpoint_dir) -> int:
    """Bytes of the weight files of a checkpoint."""
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(checkpoint_dir).glob("*.safetensors"))


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


@torch.no_grad()
def prefill_latency(model, vocab_size: int, tokens: int = 256, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds for one forward pass over a batch of one ``tokens``-long sequence."""
    import time

    ids = torch.randint(0, vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(model.parameters()).device)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return _median(times)


@torch.no_grad()
def decode_tokens_per_second(model, vocab_size: int, prompt_tokens: int = 16, new_tokens: int = 64,
                             repeats: int = 3, warmup: int = 1) -> float:
    """Median greedy decode throughput (batch 1, KV cache on), prompt excluded from the count."""
    import time

    ids = torch.randint(0, vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(model.parameters()).device)
    rates = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0)
        if i >= warmup:
            rates.append(new_tokens / (time.perf_counter() - start))
    return _median(rates)


@torch.no_grad()
def mean_pooled_embeddings(model, tokenizer, sentences: list[str], batch_size: int = 16) -> torch.Tensor:
    """(N, hidden) attention-mask-weighted mean of an encoder's last hidden states."""
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[start:start + batch_size], padding=True, truncation=True, max_length=128,
                          return_tensors="pt")
        hidden = model(**batch).last_hidden_state  # (B, T, hidden)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def embedding_fidelity(dense, pruned, tokenizer, sentences: list[str]) -> float:
    """Mean cosine similarity between dense and pruned sentence embeddings."""
    a = mean_pooled_embeddings(dense, tokenizer, sentences)
    b = mean_pooled_embeddings(pruned, tokenizer, sentences)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


def measure(model, tokenizer, spec, checkpoint_dir=None, test_stream: torch.Tensor | None = None,
            ppl_seqlen: int = PPL_SEQLEN, max_windows: int | None = None, speed: bool = True,
            decode_tokens: int = 64) -> dict:
    """Parameters, size on disk, held-out perplexity and speed of one model, as a flat dict."""
    from pruneflow.arch import count_parameters

    counts = count_parameters(model)
    row = {"params": counts["total"], "non_embedding_params": counts["non_embedding"]}
    if checkpoint_dir is not None:
        row["size_mb"] = size_on_disk(checkpoint_dir) / 1e6
    if spec.causal_lm and test_stream is not None:
        row["test_ppl"] = perplexity(model, test_stream, ppl_seqlen, max_windows=max_windows)
    if speed:
        row.update(compare_speed([model], spec.causal_lm, ppl_seqlen, decode_tokens)[0])
    return row


@torch.no_grad()
def compare_speed(models: list, causal_lm: bool, tokens: int = PPL_SEQLEN, decode_tokens: int = 64,
                  rounds: int = 5) -> list[dict]:
    """Prefill latency and decode speed of several models, measured round-robin so that machine noise
    (other processes, frequency changes) falls on all of them alike. Medians over ``rounds``."""
    prefill = [[] for _ in models]
    decode = [[] for _ in models]
    for round_ in range(rounds + 1):  # round 0 warms up
        for i, model in enumerate(models):
            vocab = model.get_input_embeddings().num_embeddings
            seconds = prefill_latency(model, vocab, tokens=tokens, repeats=1, warmup=0)
            rate = decode_tokens_per_second(model, vocab, new_tokens=decode_tokens, repeats=1, warmup=0) \
                if causal_lm else None
            if round_:
                prefill[i].append(seconds * 1e3)
                decode[i].append(rate)
    rows = [{"prefill_ms": _median(p)} for p in prefill]
    if causal_lm:
        for row, rates in zip(rows, decode):
            row["decode_tok_s"] = _median(rates)
    return rows


def evaluate_dirs(dirs: list, ev, threads: int | None = None) -> dict:
    """Parameters, size, test perplexity (and, with ``ev.speed``, round-robin speed) of several checkpoints
    in one process, keyed by directory; encoders get cosine fidelity to the first."""
    from pruneflow import checkpoint

    if threads:
        torch.set_num_threads(threads)
    return evaluate_models({str(d): checkpoint.load(d) for d in dirs}, ev)


def evaluate_models(loaded: dict[str, tuple], ev) -> dict:
    """:func:`evaluate_dirs` for checkpoints already loaded: {dir: (model, tokenizer, spec)} → {dir: row}."""
    from pruneflow import calibration as C
    from pruneflow import corpus

    rows = {}
    test_docs = corpus.load_split("test")
    first = next(iter(loaded.values()))[0]
    for d, (model, tokenizer, spec) in loaded.items():
        log.info("evaluating %s", d)
        stream = C.token_stream(tokenizer, test_docs) if spec.causal_lm else None
        rows[d] = measure(model, tokenizer, spec, d, stream, ev.ppl_seqlen, ev.max_windows, speed=False)
        if not spec.causal_lm:
            sentences = [s for doc in test_docs[:64] for s in doc.split(". ")[:4]]
            rows[d]["cosine_to_first"] = embedding_fidelity(first, model, tokenizer, sentences)
    if ev.speed:
        log.info("speed: prefill and decode, all models round-robin")
        causal = all(spec.causal_lm for _, _, spec in loaded.values())
        for row, speed in zip(rows.values(), compare_speed([m for m, _, _ in loaded.values()], causal,
                                                           ev.ppl_seqlen, ev.decode_tokens)):
            row.update(speed)
    return rows
