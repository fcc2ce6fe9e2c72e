"""The embedded reference model: a small GQA Llama trained here, deterministically, on the packaged corpus.

``pruneflow reference build`` runs :func:`build`; the result is committed under ``models/reference/`` so
the default job never trains.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pruneflow.data import corpus
from pruneflow.evaluation.evaluate import perplexity

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class ReferenceConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    seq_len: int = 256
    batch_size: int = 16
    train_tokens: int = 6_500_000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    eval_every: int = 100
    eval_windows: int = 64
    seed: int = 0
    threads: int = 2
    tie_word_embeddings: bool = False
    name: str = "default"
    # Mixture of Experts (the experts unit's benchmark models): "qwen3_moe" or "mixtral"; intermediate_size is then
    # one expert's width. Trained with the family's load-balancing loss (router_aux_loss_coef), as real MoEs are.
    moe: str | None = None
    num_experts: int = 0
    experts_per_tok: int = 0
    router_aux_loss_coef: float = 0.01


#: The committed reference models (``pruneflow reference build --config NAME``). ``deep`` is the second geometry
#: every default is checked on: half again as deep, narrower, a 3:1 query/KV ratio instead of 2:1, tied
#: embeddings; same corpus, tokenizer, token budget and schedule. It trains on one thread (so a second job can run
#: beside it on a 2-core machine); thread count changes float rounding, not the recipe.
CONFIGS: dict[str, ReferenceConfig] = {
    "default": ReferenceConfig(),
    "deep": ReferenceConfig(hidden_size=192, intermediate_size=512, num_hidden_layers=12, num_attention_heads=6,
                            num_key_value_heads=2, tie_word_embeddings=True, threads=1, name="deep"),
    # two MoE geometries for the experts unit (benchmarks only; a smaller token budget than the dense ones):
    # Qwen3-MoE with 8 experts, top-2, and a deeper, narrower Mixtral with 16 experts, top-4, tied embeddings
    "moe": ReferenceConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, train_tokens=1_500_000, threads=1, name="moe", moe="qwen3_moe",
                           num_experts=8, experts_per_tok=2),
    "moe-mixtral": ReferenceConfig(hidden_size=96, intermediate_size=96, num_hidden_layers=6, num_attention_heads=6,
                                   num_key_value_heads=2, train_tokens=1_500_000, threads=1, tie_word_embeddings=True,
                                   name="moe-mixtral", moe="mixtral", num_experts=16, experts_per_tok=4),
}
#: Where each is written (the dense ones are committed; the MoE ones are rebuilt by benchmarks/experts.py).
OUT_DIRS = {"default": "models/reference", "deep": "models/reference-deep", "moe": "models/reference-moe",
            "moe-mixtral": "models/reference-moe-mixtral"}


def train_tokenizer(documents: list[str], vocab_size: int):
    """Byte-level BPE trained on the train split, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                   model_max_length=2048)


def encode_documents(tokenizer, documents: list[str]) -> torch.Tensor:
    """Concatenate documents, each followed by EOS, into one 1-D token stream."""
    ids: list[int] = []
    for batch_start in range(0, len(documents), 512):
        for doc_ids in tokenizer(documents[batch_start:batch_start + 512], add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(doc_ids)
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def llama_config(cfg: ReferenceConfig, tokenizer):
    from transformers import LlamaConfig, MixtralConfig, Qwen3MoeConfig

    if cfg.moe == "qwen3_moe":
        return Qwen3MoeConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.intermediate_size,
            intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
            head_dim=cfg.hidden_size // cfg.num_attention_heads, num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.experts_per_tok, norm_topk_prob=True, max_position_embeddings=2048,
            router_aux_loss_coef=cfg.router_aux_loss_coef, bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=cfg.tie_word_embeddings)
    if cfg.moe == "mixtral":
        return MixtralConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads, num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.experts_per_tok, max_position_embeddings=2048,
            router_aux_loss_coef=cfg.router_aux_loss_coef, bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=cfg.tie_word_embeddings)
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=2048,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False, mlp_bias=False,
    )


def _lr_at(step: int, total: int, cfg: ReferenceConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def unigram_perplexity(train_ids: torch.Tensor, test_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one unigram model fitted on train: the floor any LM must beat."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[test_ids].mean().item())


def train(model, train_ids: torch.Tensor, val_ids: torch.Tensor, cfg: ReferenceConfig) -> list[dict]:
    """Seeded, deterministic next-token training on random windows; returns the training curve."""
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    total_steps = math.ceil(cfg.train_tokens / tokens_per_step)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    curve, running, start = [], [], time.perf_counter()
    bar = tqdm(range(total_steps), desc="train reference", unit="step")
    for step in bar:
        starts = torch.randint(0, len(train_ids) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s:s + cfg.seq_len] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, total_steps, cfg)
        model.train()
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step + 1 == total_steps:
            model.eval()
            val_ppl = perplexity(model, val_ids, cfg.seq_len, max_windows=cfg.eval_windows)
            point = {"step": step + 1, "tokens": (step + 1) * tokens_per_step,
                     "train_loss": sum(running) / len(running), "val_ppl": val_ppl,
                     "seconds": time.perf_counter() - start}
            curve.append(point)
            running = []
            bar.set_postfix(loss=f"{point['train_loss']:.3f}", val_ppl=f"{val_ppl:.1f}")
    model.eval()
    return curve


def build(out_dir: Path, cfg: ReferenceConfig = ReferenceConfig()) -> dict:
    """Train tokenizer and model from the packaged corpus and write the checkpoint plus a model card."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(cfg.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # BPE training order independent of thread scheduling
    docs = {split: corpus.load_split(split) for split in corpus.SPLITS}
    tokenizer = train_tokenizer(docs["train"], cfg.vocab_size)
    ids = {split: encode_documents(tokenizer, docs[split]) for split in corpus.SPLITS}
    log.info("tokens: %s", {k: len(v) for k, v in ids.items()})
    config = llama_config(cfg, tokenizer)
    if cfg.moe:
        config.output_router_logits = True  # training adds the load-balancing loss; the saved config turns it off
    model = AutoModelForCausalLM.from_config(config).float()
    started = time.perf_counter()
    curve = train(model, ids["train"], ids["validation"], cfg)
    train_seconds = time.perf_counter() - started
    results = {
        "test_ppl": perplexity(model, ids["test"], cfg.seq_len),
        "validation_ppl": perplexity(model, ids["validation"], cfg.seq_len),
        "unigram_test_ppl": unigram_perplexity(ids["train"], ids["test"], cfg.vocab_size),
        "train_seconds": train_seconds,
        "split_tokens": {k: len(v) for k, v in ids.items()},
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.output_router_logits = False
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(
        {"config": asdict(cfg), "results": results, "curve": curve, "corpus_digest": corpus.digest(),
         "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count()}, indent=2) + "\n")
    _write_card(tmp, cfg, results, curve)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return results


def _write_card(out_dir: Path, cfg: ReferenceConfig, results: dict, curve: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p["tokens"] / 1e6 for p in curve], [p["val_ppl"] for p in curve], label="validation ppl")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "training_curve.png", dpi=100)
    plt.close(fig)
    rows = "\n".join(f"| {p['step']} | {p['tokens'] / 1e6:.2f} | {p['train_loss']:.3f} | {p['val_ppl']:.1f} |"
                     for p in curve[:: max(1, len(curve) // 12)] + curve[-1:])
    model_class = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}.get(cfg.moe, "LlamaForCausalLM")
    experts = f", {cfg.num_experts} experts (top-{cfg.experts_per_tok}) per layer" if cfg.moe else ""
    (out_dir / "README.md").write_text(f"""# pruneflow reference model

A small GQA `{model_class}` trained by `pruneflow reference build --config {cfg.name}` on the packaged corpus (`data/corpus/`:
Wikipedia summaries, CC BY-SA 3.0, and the Brown corpus; see `data/corpus/ATTRIBUTION.md`). It exists so the
pipeline has a real trained model to prune without any model hub.

- **Architecture**: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query
  heads / {cfg.num_key_value_heads} KV heads (head_dim {cfg.hidden_size // cfg.num_attention_heads}),
  intermediate {cfg.intermediate_size}{experts}, byte-level BPE vocabulary of {cfg.vocab_size}, {'tied' if cfg.tie_word_embeddings else 'untied'} embeddings;
  {results['parameters']:,} parameters.
- **Training**: {cfg.train_tokens:,} tokens ({cfg.batch_size} × {cfg.seq_len} per step, random windows of the
  train split), AdamW lr {cfg.lr} with {cfg.warmup_steps} warm-up steps and cosine decay, weight decay
  {cfg.weight_decay}, seed {cfg.seed}, `torch.use_deterministic_algorithms(True)`, {cfg.threads} CPU threads:
  {results['train_seconds'] / 60:.1f} min on the build machine.
- **Test perplexity** (the pinned protocol: non-overlapping {cfg.seq_len}-token windows over the whole test
  split, {results['split_tokens']['test']:,} tokens): **{results['test_ppl']:.2f}**; validation
  {results['validation_ppl']:.2f}; an add-one unigram model scores {results['unigram_test_ppl']:.1f}.

Training curve (val ppl here is on the first {cfg.eval_windows} validation windows only):

| step | tokens (M) | train loss | val ppl |
|---:|---:|---:|---:|
{rows}

![training curve](training_curve.png)
""")

