"""``pruneflow prune --dry-run``: the plan of work of a prune from the config alone — no weight is read.

The model is built on the meta device from its config (every shape, no bytes), so a directory holding only
``config.json`` (and a tokenizer) of a 70B model is enough. Per phase: forward passes over the blocks, tokens
through them, bytes read from the checkpoint files and the memory held at once — in memory (the weights, one
batch's activations, a chunk of logits) or streamed under ``--max-memory`` (:func:`streaming.requirement`, the
same accounting the streamed run is checked against) — whether that fits the device, and how ``--workers``
splits the candidate passes. The counts follow the code: Bonsai's iterations and sub-model batches, SLEB's rounds
× remaining blocks, the allocation search's generations, lstsq's pass over dense and pruned blocks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from pruneflow.model import arch as A
from pruneflow.model.arch import ArchSpec
from pruneflow.model.checkpoint import SHARD_SIZE
from pruneflow.errors import PruneflowError
from pruneflow.execution import streaming
from pruneflow.execution.losses import LOGIT_BYTES
from pruneflow.execution.objectives import resolve as resolve_objective
from pruneflow.execution.runtime import Runtime
from pruneflow.sizes import format_size, parse_size
from pruneflow.model import checkpoint, modeling_pruneflow
from pruneflow.methods import METHODS

STATISTIC_METHODS = {"wanda_sp", "flap", "minitron", "block_influence", "angular", "router_weighted",
                     "expert_drop", "taylor"}


@dataclass
class Phase:
    name: str
    passes: int  # forward passes over the blocks (streamed: each reads every block once)
    tokens: int  # tokens through the blocks
    read_bytes: int  # bytes read from the checkpoint files
    peak_bytes: int  # memory held at once (the device's; the host's on a CPU)
    candidates: int = 0  # sub-models evaluated (split over --workers)
    repeat: int = 1  # the phase runs this many times (Bonsai's iterations, SLEB's rounds)
    host_bytes: int = 0  # kept on the host meanwhile: the objective's reference (in peak_bytes too on a CPU)

    def total(self, field: str) -> int:
        return self.repeat * getattr(self, field)


@dataclass
class Estimate:
    model: str
    dtype: str
    parameters: int
    weight_bytes: int
    streamed: bool
    phases: list[Phase]
    peak_bytes: int
    available: int | None  # the device's memory (free GPU memory; the host's available memory on a CPU)
    fits: bool
    why: str
    workers: int

    def to_dict(self) -> dict:
        return {**asdict(self), "phases": [asdict(p) for p in self.phases]}


def skeleton(path: Path) -> tuple[nn.Module, ArchSpec, torch.dtype]:
    """The model of ``path``'s config.json on the meta device, its spec, and the dtype its config states."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    model_type = checkpoint.read_config(path).get("model_type", "")
    spec = A.arch_for(model_type)
    if model_type.startswith(A.PRUNED_PREFIX):
        config_cls, model_cls, _ = modeling_pruneflow.CLASSES[A.base_model_type(model_type)]
        config, build = config_cls.from_pretrained(path), model_cls._from_config
    else:
        config = AutoConfig.from_pretrained(path)
        build = (AutoModelForCausalLM if spec.causal_lm else AutoModel).from_config
    stated = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    stated = getattr(torch, stated) if isinstance(stated, str) else stated
    with init_empty_weights(include_buffers=False):
        model = build(config, dtype=stated)
    return model, spec, stated


def _bytes(module: nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in module.parameters()) * dtype.itemsize


def _work(config, rows: int, seqlen: int, dtype: torch.dtype) -> int:
    """One batch's activations inside a block: the MLP's widest, and the attention scores."""
    inner = max(config.intermediate_size * 3, config.hidden_size * 4)
    return rows * seqlen * inner * dtype.itemsize + rows * config.num_attention_heads * seqlen * seqlen * 4


def _logits(config, rows: int, seqlen: int) -> int:
    return int(2.5 * min(LOGIT_BYTES, rows * seqlen * config.vocab_size * 4))


def iterations(method: str, params) -> int:
    """How many score → apply rounds an iterative method runs (Bonsai: ⌈ratio / prune_frac⌉)."""
    return math.ceil(params.prune.ratio / params.score.bonsai.prune_frac - 1e-9) if method == "bonsai" else 1


def candidate_batches(method: str, params, n_blocks: int, blocks_removed: int) -> list[tuple]:
    """(phase, candidates, batches, rows per batch, repeat, windows measured) of the candidate phases ``method``
    runs."""
    c, out = params.calibrate, []
    if method == "bonsai":
        options = params.score.bonsai
        rows = options.rows_per_forward
        batches = math.ceil(options.sub_models * options.n_windows / rows)
        out.append(("bonsai sub-models", options.sub_models, batches, rows, iterations(method, params),
                    options.n_windows))
    if method == "sleb":  # round k tries the n_blocks − k remaining blocks: the first round, the most
        out.append(("sleb candidates", n_blocks, n_blocks * math.ceil(c.n_windows / 8), min(8, c.n_windows),
                    blocks_removed, c.n_windows))
    if params.prune.allocation == "search":
        search = params.prune.search
        windows = min(search.windows, c.n_windows)
        out.append(("allocation search", search.budget, search.budget, windows, 1, windows))
    return out


def estimate(path: Path, params, runtime: Runtime, workers: int = 1) -> Estimate:
    """The plan of work of ``pruneflow prune`` with ``params`` on ``runtime`` (see the module docstring)."""
    method, c = params.score.method, params.calibrate
    model, spec, stated = skeleton(path)
    dtype = runtime.dtype or stated
    config, blocks = model.config, A.blocks(model, spec)
    block_sizes = [_bytes(block, dtype) for block in blocks]
    weight_bytes = _bytes(model, dtype)
    head = config.vocab_size * config.hidden_size * dtype.itemsize
    streamed = runtime.streams(weight_bytes)
    if streamed and not METHODS[method].streams:
        raise PruneflowError(f"method {method} needs the whole model in memory ({format_size(weight_bytes)} of "
                             f"weights); --max-memory is {format_size(runtime.max_memory)}")
    tokens = c.n_windows * c.seqlen
    converts = dtype != stated  # the checkpoint's stored dtype is the one its config states
    max_shard = parse_size(SHARD_SIZE)  # --max-shard-size's default: a shard's tensors are gathered, then written
    shard = streaming.shard_limit(max_shard, runtime.max_memory) if streamed else None
    need = streaming.requirement(block_sizes, config, spec, dtype, c.n_windows, c.seqlen, converts, shard)
    every_block = sum(block_sizes)
    embedding_reads = head  # one sweep over the embedding for every batch of a pass (streaming.Lookup)

    def in_memory(rows: int, seqlen: int, losses: bool) -> int:
        return weight_bytes + _work(config, rows, seqlen, dtype) + (_logits(config, rows, seqlen) if losses else 0)

    phases = [Phase("load", 0, 0, 0 if streamed else weight_bytes,
                    need["phases"]["embedding"] if streamed else weight_bytes)]
    if method in STATISTIC_METHODS or method == "bonsai" or params.prune.reconstruct == "bias":
        rows = min(c.n_windows, streaming.BATCH)
        phases.append(Phase("calibration statistics", 1, tokens, every_block + embedding_reads if streamed else 0,
                            need["phases"]["blocks"] if streamed else in_memory(rows, c.seqlen, False),
                            repeat=iterations(method, params)))
    if method == "magnitude":
        phases.append(Phase("weight norms", 0, 0, every_block if streamed else 0,
                            2 * need["block"] if streamed else weight_bytes))
    removed_blocks = 0
    if "layers" in (params.prune.units if params.prune.units != "auto" else METHODS[method].auto_units or ()):
        mean_block = every_block / len(block_sizes)
        removed_blocks = min(len(blocks) - 1, max(1, round(params.prune.ratio * every_block / mean_block)))
    # kl/hidden keep the unmasked model's final hidden states of the measured windows on the host (in the model's
    # dtype) while candidates run: in the budget's memory on a CPU, beside it on a GPU
    kind = resolve_objective(params.score.objective, spec.causal_lm)
    for name, count, n_batches, rows, repeat, windows in candidate_batches(method, params, len(blocks),
                                                                           removed_blocks):
        seqlen = c.seqlen
        reference = windows * seqlen * config.hidden_size * dtype.itemsize if kind != "loss" else 0
        held = reference if runtime.device.type == "cpu" else 0
        if streamed:
            per = streaming.requirement(block_sizes, config, spec, dtype, rows, seqlen, converts, shard)
            fixed = max(2 * per["block"] + per["work"], per["head"] + per["logits"])
            budget = runtime.max_memory
            group = max(1, min(budget // 4, budget - held - fixed) // per["carried"])  # streaming.loss_group
            passes = math.ceil(n_batches / group)
            read = passes * (every_block + head) + head  # blocks and head per group of batches; one lookup sweep
            peak = fixed + min(group, n_batches) * per["carried"] + held
        else:
            passes, read, peak = n_batches, 0, in_memory(rows, seqlen, True) + held
        phases.append(Phase(name, passes, n_batches * rows * seqlen, read, peak, count, repeat, reference))
    if params.prune.reconstruct == "lstsq":
        geo = A.geometry(config)
        columns = max(max(w["heads"] * geo.head_dim, w["channels"]) for w in A.layer_widths(model, spec))
        solve = (2 * columns * columns + 3 * columns * config.hidden_size) * 8  # reconstruct.solve_bytes
        states = 3 * tokens * config.hidden_size * dtype.itemsize
        held = (2 * need["block"] if streamed else weight_bytes + need["block"]) + states + solve
        phases.append(Phase("lstsq re-fit", 2, 2 * tokens, 2 * every_block if streamed else 0, held))
    kept = int((weight_bytes - 2 * head) * (1 - params.prune.ratio)) + 2 * head  # the pruned model
    phases.append(Phase("save", 0, 0, every_block + 2 * head if streamed else 0,
                        need["phases"]["save"] if streamed else kept + min(max_shard, kept)))
    peak = max(p.peak_bytes for p in phases)
    available, fits, why = _room(runtime, peak, streamed)
    return Estimate(model=str(path), dtype=str(dtype).removeprefix("torch."),
                    parameters=sum(p.numel() for p in model.parameters()), weight_bytes=weight_bytes,
                    streamed=streamed, phases=phases, peak_bytes=peak, available=available, fits=fits, why=why,
                    workers=workers)


def _room(runtime: Runtime, peak: int, streamed: bool) -> tuple[int | None, bool, str]:
    if runtime.device.type == "cuda":
        available = torch.cuda.mem_get_info(runtime.device)[0]
        where = f"{runtime.device}'s free memory"
    else:
        import psutil

        available = psutil.virtual_memory().available
        where = "this machine's available memory"
    if streamed and peak > runtime.max_memory:
        return available, False, (f"the largest phase holds {format_size(peak)}, above --max-memory "
                                  f"{format_size(runtime.max_memory)}")
    if peak > available:
        return available, False, f"the largest phase holds {format_size(peak)}, above {where} ({format_size(available)})"
    return available, True, f"the largest phase holds {format_size(peak)} of {where} ({format_size(available)})"
