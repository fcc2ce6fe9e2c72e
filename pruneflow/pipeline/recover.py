"""LoRA recovery of a pruned model (peft), optionally distilled from the dense model.

loss = CE(next token) + λ·KL(teacher ‖ student) on the logits, the teacher frozen (Bonsai's recovery uses
λ = 0.01). Only the LoRA matrices train; they are merged into the weights at the end (``merge_and_unload``),
so the recovered model has the pruned model's shapes and saves as the same kind of checkpoint.

Memory: pruning and LoRA leave the LM head alone, so the teacher's logits are the student's head applied to the
teacher's final hidden states. Those are either computed per step by the teacher in memory, or — when they take
less room than the teacher's weights (:func:`precompute_pays`) — computed once for every step's batch before
training (:func:`teacher_states`), after which the teacher is not needed. Losses over the vocabulary are chunked
(``pruneflow.execution.losses``); gradient checkpointing turns on where a batch's activations would not fit otherwise.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pruneflow.model import mlp
from pruneflow.model.arch import ArchSpec
from pruneflow.errors import PruneflowError
from pruneflow.execution.losses import hidden_states, lm_parts, training_losses
from pruneflow.pipeline.params import RecoverParams
from pruneflow.execution.runtime import Runtime
from pruneflow.execution.lineage import note_changed

log = logging.getLogger(__name__)


@dataclass
class RecoveryResult:
    model: nn.Module  # the merged model (plain nn.Linear layers again), eval mode
    history: list[dict] = field(default_factory=list)  # per step: step, loss, ce, kd, lr
    seconds: float = 0.0
    gradient_checkpointing: bool = False


@dataclass
class TeacherStates:
    """The teacher's final hidden states for every training step's batch (host memory, the model's dtype)."""
    states: list[torch.Tensor]
    head_digest: str  # sha256 of the teacher's LM head: the student's must be the same weights
    head: nn.Module | None = None  # the teacher's head itself, kept when the student's is narrower (hidden unit)


def expert_parameters(spec: ArchSpec, targets: list[str]) -> list[str]:
    """peft ``target_parameters`` for an MoE model: its MLP targets (gate, up, down) are the fused expert tensors
    (gate and up share ``gate_up_proj``)."""
    return mlp.of(spec).lora_parameters(spec, targets)


def target_modules(model: nn.Module, spec: ArchSpec, targets: list[str]) -> list[str]:
    """peft ``target_modules`` (module-path suffixes) for ArchSpec keys such as ``q`` or ``down`` (an MoE
    model's MLP keys: :func:`expert_parameters`)."""
    paths = []
    for key in targets:
        if key in mlp.of(spec).fused_keys:  # a parameter target (expert_parameters), not a module
            continue
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


def batch_order(n_windows: int, cfg: RecoverParams) -> list[torch.Tensor]:
    """The window indices of every step's batch, seeded."""
    order = torch.Generator().manual_seed(cfg.seed)
    return [torch.randint(0, n_windows, (cfg.batch_size,), generator=order) for _ in range(cfg.steps)]


def precompute_pays(teacher_config, teacher_bytes: int, cfg: RecoverParams, dtype: torch.dtype) -> bool:
    """Whether every step's teacher hidden states (steps × batch × seqlen × hidden) take less memory than the
    teacher's weights: then they are computed once and the teacher is dropped, else the teacher stays."""
    states = cfg.steps * cfg.batch_size * cfg.seqlen * teacher_config.hidden_size * dtype.itemsize
    return states < teacher_bytes


def _head_digest(model: nn.Module) -> str:
    weight = lm_parts(model)[1].weight.detach().contiguous().cpu()
    return hashlib.sha256(weight.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


@torch.no_grad()
def teacher_states(teacher: nn.Module, windows: torch.Tensor, cfg: RecoverParams,
                   runtime: Runtime | None = None, keep_head: bool = False) -> TeacherStates:
    """The teacher's final hidden states of every step's batch, kept in host memory (with a copy of its LM head
    when ``keep_head``: a student pruned in the hidden dimension has a narrower one)."""
    runtime = runtime or Runtime()
    teacher.eval()
    device = runtime.input_device(teacher)
    states = [hidden_states(teacher, windows[rows].to(device)).cpu()
              for rows in tqdm(batch_order(len(windows), cfg), desc="teacher states", unit="batch", leave=False)]
    head = copy.deepcopy(lm_parts(teacher)[1]).cpu().requires_grad_(False) if keep_head else None
    return TeacherStates(states=states, head_digest=_head_digest(teacher), head=head)


def needs_checkpointing(model: nn.Module, cfg: RecoverParams, runtime: Runtime) -> bool:
    """``gradient_checkpointing: auto``: on when one batch's training activations (about 34 · tokens · hidden
    bytes per block at 16 bits, Korthikanti et al. 2022) would not fit the device's free memory."""
    if cfg.gradient_checkpointing != "auto":
        return bool(cfg.gradient_checkpointing)
    config = model.config
    itemsize = next(model.parameters()).element_size()
    activations = 34 * cfg.batch_size * cfg.seqlen * config.hidden_size * config.num_hidden_layers * itemsize / 2
    if runtime.device.type == "cuda":
        free = torch.cuda.mem_get_info(runtime.device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return activations > 0.8 * free


def recover(model: nn.Module, windows: torch.Tensor, spec: ArchSpec, cfg: RecoverParams,
            teacher: nn.Module | TeacherStates | None = None, runtime: Runtime | None = None) -> RecoveryResult:
    """Train LoRA adapters on ``windows`` (N, T) for ``cfg.steps`` steps and merge them into ``model``.

    ``teacher``: the dense model, or its precomputed :class:`TeacherStates`. Deterministic for a given seed
    (adapter init, batch order, dropout) on one device and thread count.
    """
    started = time.perf_counter()
    runtime = runtime or Runtime()
    checkpointing = needs_checkpointing(model, cfg, runtime)
    student, history = train_lora(model, windows, spec, cfg, teacher, runtime, checkpointing)
    merged = student.merge_and_unload()
    merged.eval()

    note_changed(merged, "LoRA adapters were merged into it")
    return RecoveryResult(model=merged, history=history, seconds=time.perf_counter() - started,
                          gradient_checkpointing=checkpointing)


def teacher_head(model: nn.Module, teacher: nn.Module | TeacherStates) -> nn.Module | None:
    """The head that turns the teacher's hidden states into its logits when the student's cannot (a student
    pruned in the hidden dimension); None: the student's own (the same weights, checked)."""
    head = teacher.head if isinstance(teacher, TeacherStates) else lm_parts(teacher)[1]
    student = lm_parts(model)[1]
    if head is None or head.in_features == student.in_features:
        return None
    if head.out_features != student.out_features:
        raise PruneflowError(f"distillation: the teacher's vocabulary ({head.out_features}) is not the pruned "
                             f"model's ({student.out_features})")
    return head


def _check_teacher(model: nn.Module, teacher: nn.Module | TeacherStates) -> nn.Module | None:
    """The teacher's own head for a narrower student (hidden unit), else None after checking that the student's
    head is the teacher's."""
    head = teacher_head(model, teacher)
    if head is not None:
        return head
    same = (_head_digest(model) == teacher.head_digest if isinstance(teacher, TeacherStates)
            else torch.equal(lm_parts(model)[1].weight.cpu(), lm_parts(teacher)[1].weight.cpu()))
    if not same:
        raise PruneflowError("distillation: the pruned model's LM head is not the dense model's; recover a model "
                             "pruned from recover's teacher (params `model`), or set recover.distill_weight: 0")


def train_lora(model: nn.Module, windows: torch.Tensor, spec: ArchSpec, cfg: RecoverParams,
               teacher: nn.Module | TeacherStates | None = None, runtime: Runtime | None = None,
               checkpointing: bool = False) -> tuple[nn.Module, list[dict]]:
    """The training loop; returns the PEFT model (adapters not merged, eval mode) and the per-step history."""
    from peft import LoraConfig, get_peft_model

    runtime = runtime or Runtime()
    distill = teacher is not None and cfg.distill_weight > 0
    head = None
    if distill:
        head = _check_teacher(model, teacher)
        if isinstance(teacher, nn.Module):
            teacher.eval().requires_grad_(False)
        if head is not None:
            head = head.to(lm_parts(model)[1].weight.device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(cfg.seed)
    parameters = expert_parameters(spec, cfg.targets)
    dropout = cfg.dropout
    if parameters and dropout:  # peft's LoRA on a bare parameter (ParamWrapper) has no dropout
        log.warning("recover.dropout=%g is not applied: peft's LoRA on the fused expert tensors has no dropout "
                    "(training without it)", dropout)
        dropout = 0.0
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=dropout, bias="none",
                      target_modules=target_modules(model, spec, cfg.targets), target_parameters=parameters or None)
    with warnings.catch_warnings():  # peft reads transformers' deprecated alias: nothing a user can act on
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        student = get_peft_model(model, lora)
    student.train()
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _schedule(step, cfg))
    device = runtime.input_device(model)
    # fp16 activations underflow in the backward pass without loss scaling (bf16 and fp32 do not need it)
    scaler = torch.amp.GradScaler(device.type, enabled=next(model.parameters()).dtype == torch.float16)
    history = []
    bar = tqdm(batch_order(len(windows), cfg), desc="recover (LoRA)", unit="step")
    for step, rows in enumerate(bar):
        batch = windows[rows].to(device)
        target = None
        if distill and isinstance(teacher, TeacherStates):
            target = teacher.states[step]
        elif distill:
            with torch.no_grad():
                target = hidden_states(teacher, batch.to(runtime.input_device(teacher)))
        ce, kd = training_losses(student, batch, target, head)
        loss = ce + cfg.distill_weight * kd
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        history.append({"step": step, "loss": loss.item(), "ce": ce.item(), "kd": kd.item(),
                        "lr": scheduler.get_last_lr()[0]})
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    student.eval()
    if checkpointing:
        student.get_base_model().gradient_checkpointing_disable()
    return student, history
