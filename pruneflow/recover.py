"""LoRA recovery of a pruned model (peft), optionally distilled from the dense model.

loss = CE(next token) + λ·KL(teacher ‖ student) on the logits, the teacher frozen (Bonsai's recovery uses
λ = 0.01). Only the LoRA matrices train; they are merged into the weights at the end (``merge_and_unload``),
so the recovered model has the pruned model's shapes and saves as the same kind of checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pruneflow.arch import ArchSpec
from pruneflow.errors import PruneflowError
from pruneflow.params import RecoverParams


@dataclass
class RecoveryResult:
    model: nn.Module  # the merged model (plain nn.Linear layers again), eval mode
    history: list[dict] = field(default_factory=list)  # per step: step, loss, ce, kd, lr
    seconds: float = 0.0


def target_modules(model: nn.Module, spec: ArchSpec, targets: list[str]) -> list[str]:
    """peft ``target_modules`` (module-path suffixes) for ArchSpec keys such as ``q`` or ``down``."""
    paths = []
    for key in targets:
        path = getattr(spec, key)
        if path is None or not any(name.endswith("." + path) for name, _ in model.named_modules()):
            raise PruneflowError(f"recover.targets: {key!r} is not a module of this model "
                                 f"({type(model).__name__}); choose from the projections it has")
        paths.append(path)
    return paths


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per token, averaged over tokens; logits (B, T, V)."""
    student = F.log_softmax(student_logits.float().flatten(0, 1), dim=-1)  # (B·T, V)
    teacher = F.log_softmax(teacher_logits.float().flatten(0, 1), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten())


def _schedule(step: int, cfg: RecoverParams) -> float:
    """Linear warm-up to 1, then linear decay to 0 at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps))


def recover(model: nn.Module, windows: torch.Tensor, spec: ArchSpec, cfg: RecoverParams,
            teacher: nn.Module | None = None) -> RecoveryResult:
    """Train LoRA adapters on ``windows`` (N, T) for ``cfg.steps`` steps and merge them into ``model``.

    Deterministic for a given seed (adapter init, batch order, dropout) on one device and thread count.
    """
    started = time.perf_counter()
    student, history = train_lora(model, windows, spec, cfg, teacher)
    merged = student.merge_and_unload()
    merged.eval()
    return RecoveryResult(model=merged, history=history, seconds=time.perf_counter() - started)


def train_lora(model: nn.Module, windows: torch.Tensor, spec: ArchSpec, cfg: RecoverParams,
               teacher: nn.Module | None = None) -> tuple[nn.Module, list[dict]]:
    """The training loop; returns the PEFT model (adapters not merged, eval mode) and the per-step history."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                      target_modules=target_modules(model, spec, cfg.targets))
    student = get_peft_model(model, lora)
    student.train()
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _schedule(step, cfg))
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    order = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    history = []
    bar = tqdm(range(cfg.steps), desc="recover (LoRA)", unit="step")
    for step in bar:
        batch = windows[torch.randint(0, len(windows), (cfg.batch_size,), generator=order)].to(device)
        logits = student(input_ids=batch).logits  # (B, T, V)
        ce = next_token_loss(logits, batch)
        kd = torch.zeros((), device=device)
        if teacher is not None and cfg.distill_weight > 0:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch).logits
            kd = distillation_loss(logits, teacher_logits)
        loss = ce + cfg.distill_weight * kd
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step, "loss": loss.item(), "ce": ce.item(), "kd": kd.item(),
                        "lr": scheduler.get_last_lr()[0]})
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    student.eval()
    return student, history
