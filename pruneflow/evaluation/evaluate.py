"""Evaluation basics: perplexity (one pinned protocol), sizes, speed, encoder fidelity."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

from pruneflow.execution.passes import nll_batches
from pruneflow.errors import PruneflowError
from pruneflow.execution.runtime import Runtime
from pruneflow.model.arch import arch_for, count_parameters
from pruneflow.model import checkpoint
from pruneflow.model.export import export_gguf
from pruneflow.data import calibration as C
from pruneflow.model.sources import ModelSource, resolve

log = logging.getLogger(__name__)

PPL_SEQLEN = 256


def windows_of(tokens: int, seqlen: int, max_windows: int | None = None) -> int:
    """How many ``seqlen``-token windows the perplexity protocol cuts from ``tokens`` (the tail is dropped)."""
    return tokens // seqlen if max_windows is None else min(tokens // seqlen, max_windows)


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seqlen: int = PPL_SEQLEN, batch_size: int = 8,
               max_windows: int | None = None, runtime: Runtime | None = None) -> float:
    """Perplexity over non-overlapping ``seqlen``-token windows of a 1-D token stream.

    The pinned protocol: the held-out text is one stream (documents joined by EOS), cut into
    consecutive windows of exactly ``seqlen`` tokens (the tail shorter than a window is dropped); every
    token but each window's first is predicted; the result is exp of the mean NLL over all of them.
    """
    n_windows = windows_of(len(token_ids), seqlen, max_windows)
    if n_windows == 0:
        raise ValueError(f"held-out text has {len(token_ids)} tokens, fewer than one {seqlen}-token window")
    windows = token_ids[: n_windows * seqlen].view(n_windows, seqlen)
    runtime = runtime or Runtime()
    batches = [windows[start:start + batch_size] for start in range(0, len(windows), batch_size)]
    losses = nll_batches(model, batches, runtime, desc="perplexity")  # (B, T - 1) per batch
    total_nll, total_tokens = 0.0, 0
    for nll in losses:
        total_nll += nll.cpu().double().sum().item()  # float64 on the host: an MPS device has none
        total_tokens += nll.numel()
    return math.exp(total_nll / total_tokens)


def size_on_disk(checkpoint_dir) -> int:
    """Bytes of the weight files of a checkpoint."""
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(checkpoint_dir).glob("*.safetensors"))


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _random_ids(model, length: int, runtime: Runtime) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    return ids.to(runtime.input_device(model))


@torch.no_grad()
def prefill_seconds(model, runtime: Runtime, tokens: int = 256) -> float:
    """Seconds of one forward pass over one ``tokens``-long sequence (kernels finished, not just queued)."""
    ids = _random_ids(model, tokens, runtime)
    runtime.synchronize()
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    runtime.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def decode_rate(model, runtime: Runtime, prompt_tokens: int = 16, new_tokens: int = 64) -> float:
    """Greedy decode throughput in tokens/s (batch 1, KV cache on), prompt excluded from the count."""
    ids = _random_ids(model, prompt_tokens, runtime)
    runtime.synchronize()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    runtime.synchronize()
    return new_tokens / (time.perf_counter() - start)


@torch.no_grad()
def mean_pooled_embeddings(model, tokenizer, sentences: list[str], batch_size: int = 16,
                           runtime: Runtime | None = None) -> torch.Tensor:
    """(N, hidden) float32, on the CPU: attention-mask-weighted mean of an encoder's last hidden states."""
    device = (runtime or Runtime()).input_device(model)
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[start:start + batch_size], padding=True, truncation=True, max_length=128,
                          return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state.float()  # (B, T, hidden)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * mask).sum(1) / mask.sum(1)).cpu())
    return torch.cat(out)


def held_out_sentences(docs: list[str], count: int, per_doc: int = 4) -> list[str]:
    """The first ``per_doc`` sentences of each of the first ``count`` documents: an encoder's fidelity set."""
    return [s for doc in docs[:count] if doc for s in doc.split(". ")[:per_doc]]


def embedding_fidelity(dense, pruned, tokenizer, sentences: list[str], runtime: Runtime | None = None) -> float:
    """Mean cosine similarity between dense and pruned sentence embeddings."""
    a = mean_pooled_embeddings(dense, tokenizer, sentences, runtime=runtime)
    b = mean_pooled_embeddings(pruned, tokenizer, sentences, runtime=runtime)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


def measure(model, tokenizer, spec, checkpoint_dir=None, test_stream: torch.Tensor | None = None,
            ppl_seqlen: int = PPL_SEQLEN, max_windows: int | None = None, speed: bool = True,
            decode_tokens: int = 64, runtime: Runtime | None = None) -> dict:
    """Parameters, size on disk, held-out perplexity and speed of one model, as a flat dict."""
    runtime = runtime or Runtime()
    counts = count_parameters(model)
    row = {"params": counts["total"], "non_embedding_params": counts["non_embedding"]}
    if checkpoint_dir is not None:
        row["size_mb"] = size_on_disk(checkpoint_dir) / 1e6
    if spec.causal_lm and test_stream is not None:
        row["test_ppl"] = perplexity(model, test_stream, ppl_seqlen, max_windows=max_windows, runtime=runtime)
    if speed:
        row.update(compare_speed([model], spec.causal_lm, ppl_seqlen, decode_tokens, runtime=runtime)[0])
    return row


@torch.no_grad()
def compare_speed(models: list, causal_lm: bool, tokens: int = PPL_SEQLEN, decode_tokens: int = 64,
                  rounds: int = 5, runtime: Runtime | None = None) -> list[dict]:
    """Prefill latency and decode speed of one or more models in memory: one warm-up round, then ``rounds``
    rounds, round-robin over the models so that machine noise (other processes, clock changes) falls on all of
    them alike; medians."""
    runtime = runtime or Runtime()
    prefill = [[] for _ in models]
    decode = [[] for _ in models]
    for round_ in range(rounds + 1):  # round 0 warms up
        for i, model in enumerate(models):
            seconds = prefill_seconds(model, runtime, tokens)
            rate = decode_rate(model, runtime, new_tokens=decode_tokens) if causal_lm else None
            if round_:
                prefill[i].append(seconds * 1e3)
                decode[i].append(rate)
    rows = [{"prefill_ms": _median(p)} for p in prefill]
    if causal_lm:
        for row, rates in zip(rows, decode):
            row["decode_tok_s"] = _median(rates)
    return rows


def llama_cpp_engine(path, threads: int, logits_all: bool = False, n_ctx: int = 512):
    """A llama-cpp-python model on the CPU with an f32 KV cache (the exact one) and no flash attention."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise PruneflowError("llama.cpp speed needs llama-cpp-python (pip install llama-cpp-python; it builds "
                             "llama.cpp from source)") from None
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all, type_k=0, type_v=0,
                 flash_attn=False, n_threads=threads, n_threads_batch=threads, verbose=False)


def llama_cpp_perplexity(path, token_ids: torch.Tensor, seqlen: int = PPL_SEQLEN, max_windows: int | None = None,
                         threads: int = 1) -> float:
    """Perplexity of a GGUF file measured in llama.cpp, by the protocol of :func:`perplexity` (the same windows,
    every token but each window's first predicted): each window evaluated from an empty KV cache, the NLL taken
    from the engine's own logits (float64 on the host)."""
    import numpy as np

    n_windows = windows_of(len(token_ids), seqlen, max_windows)
    if n_windows == 0:
        raise PruneflowError(f"held-out text has {len(token_ids)} tokens, fewer than one {seqlen}-token window")
    windows = token_ids[: n_windows * seqlen].view(n_windows, seqlen).tolist()
    llm = llama_cpp_engine(path, threads, logits_all=True, n_ctx=seqlen)
    total_nll = 0.0
    try:
        for ids in windows:
            llm.reset()
            llm.eval(ids)
            logits = np.asarray(llm.scores[: seqlen - 1], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            log_z = (top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)))
            total_nll += float((log_z - logits[np.arange(seqlen - 1), ids[1:]]).sum())
    finally:
        llm.close()
    return math.exp(total_nll / (n_windows * (seqlen - 1)))


def llama_cpp_speed(ggufs: list, vocab: int, threads: int, tokens: int = PPL_SEQLEN, decode_tokens: int = 64,
                    rounds: int = 5) -> list[dict]:
    """llama.cpp's prefill latency (``tokens`` tokens, ms) and greedy decode speed (``decode_tokens`` after a
    16-token prompt, tokens/s) of GGUF files, by the protocol of :func:`compare_speed`: one warm-up round, then
    ``rounds`` rounds round-robin over the files, medians."""
    import numpy as np

    ids = torch.randint(1, vocab, (max(tokens, 16),), generator=torch.Generator().manual_seed(0)).tolist()
    engines = [llama_cpp_engine(path, threads, n_ctx=max(tokens, 16 + decode_tokens)) for path in ggufs]
    prefill, decode = [[] for _ in engines], [[] for _ in engines]
    try:
        for round_ in range(rounds + 1):  # round 0 warms up
            for i, llm in enumerate(engines):
                llm.reset()
                start = time.perf_counter()
                llm.eval(ids[:tokens])
                seconds = time.perf_counter() - start
                llm.reset()
                llm.eval(ids[:16])
                start = time.perf_counter()
                for _ in range(decode_tokens):
                    llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
                rate = decode_tokens / (time.perf_counter() - start)
                if round_:
                    prefill[i].append(seconds * 1e3)
                    decode[i].append(rate)
    finally:
        for llm in engines:
            llm.close()
    return [{"llama_cpp_prefill_ms": _median(p), "llama_cpp_decode_tok_s": _median(d)}
            for p, d in zip(prefill, decode)]


def add_llama_cpp_speed(models: dict, rows: dict, ev, threads: int) -> None:
    """Each causal LM exported to a temporary GGUF in its checkpoint's dtype (what would be deployed: an 8B bf16
    model is 16 GB there, not 32) and measured in llama.cpp (:func:`llama_cpp_speed`), round-robin over all of
    them; the figures go into ``rows``."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="pruneflow-gguf-") as tmp:
        files = {}
        for name, source in models.items():
            files[name] = Path(tmp) / f"{name}.gguf"
            log.info("exporting %s to GGUF for llama.cpp", source.name)
            export_gguf(source, files[name], "auto")
        vocab = checkpoint.read_config(next(iter(models.values()))).get("vocab_size", 2)
        speeds = llama_cpp_speed(list(files.values()), vocab, threads, ev.ppl_seqlen, ev.decode_tokens)
    for name, speed in zip(files, speeds):
        rows[name].update(speed)


def check_streamed(models: dict, ev, runtime: Runtime, tasks: bool) -> None:
    """Before any model is measured: a model above the runtime's ``max_memory`` is streamed, and only its
    perplexity can be measured that way (speed and lm-eval tasks need it whole)."""
    if runtime.max_memory is None:
        return
    for name, source in models.items():
        if runtime.streams(checkpoint.compute_size(source, runtime)[1]) and (ev.speed or tasks):
            asked = " and ".join(what for what, on in (("speed", ev.speed), ("lm-eval tasks", tasks)) if on)
            raise PruneflowError(f"{name} exceeds --max-memory and is streamed, which measures perplexity only: "
                                 f"{asked} need the whole model (evaluate.speed: false, evaluate.tasks: [] or "
                                 f"--no-speed; or a larger --max-memory)")


def evaluate_dirs(models: dict, ev, runtime: Runtime | None = None, threads: int | None = None,
                  each: Callable | None = None) -> dict:
    """Parameters, size, test perplexity (and, with ``ev.speed``, speed) of several checkpoints
    (``{name: directory, hub id or ModelSource}``), keyed by name. One model is in memory at a time: each is
    loaded, measured (then ``each(name, model, tokenizer, row)`` runs, e.g. lm-eval) and freed before the next.
    Encoders get cosine fidelity to the first."""
    runtime = runtime or Runtime()
    if threads:
        torch.set_num_threads(threads)
    models = {name: s if isinstance(s, ModelSource) else resolve(s) for name, s in models.items()}
    for name, source in models.items():  # every model's refusals before the first is measured
        config = checkpoint.read_config(source)
        if arch_for(config.get("model_type", "")).causal_lm:  # perplexity windows (an encoder has none)
            C.check_seqlen(ev.ppl_seqlen, config.get("max_position_embeddings"), "evaluate.ppl_seqlen", f"{name}'s")
    check_streamed(models, ev, runtime, tasks=each is not None)
    text = C.read_source(ev.source, split="test", what=C.HELD_OUT)  # a missing file or dataset: said before any model loads
    rows, reference, causal_lm = {}, None, True
    sentences = held_out_sentences(text[0], 64)
    for name, source in models.items():
        log.info("evaluating %s on %s", source.name, runtime)
        model, tokenizer, spec = checkpoint.load(source, runtime, stream=True, calibration=(8, ev.ppl_seqlen),
                                                 purpose="evaluation")
        stream = C.held_out(tokenizer, ev.source, text) if spec.causal_lm else None
        row = measure(model, tokenizer, spec, source.path, stream, ev.ppl_seqlen, ev.max_windows, speed=ev.speed,
                      decode_tokens=ev.decode_tokens, runtime=runtime)
        if not spec.causal_lm:
            embeddings = mean_pooled_embeddings(model, tokenizer, sentences, runtime=runtime)
            reference = embeddings if reference is None else reference
            row["cosine_to_first"] = torch.nn.functional.cosine_similarity(reference, embeddings, dim=-1).mean().item()
        if "test_ppl" in row:
            row["ppl_windows"] = windows_of(len(stream), ev.ppl_seqlen, ev.max_windows)
        if each is not None:
            each(name, model, tokenizer, row)
        rows[name] = row
        causal_lm = causal_lm and spec.causal_lm
        del model
        runtime.free()
    if ev.llama_cpp and causal_lm:
        add_llama_cpp_speed(models, rows, ev, torch.get_num_threads())
    return rows
