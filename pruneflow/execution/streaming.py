"""Models larger than memory: the weights stay in their safetensors files and one block at a time is loaded.

A *streamed* model is the model's skeleton on the meta device (every shape, no weight bytes; accelerate's
``init_empty_weights`` keeps buffers such as the RoPE frequencies real) with a :class:`Stream` attached: where
each tensor lives on disk and the dense block structure those tensors fill. ``checkpoint.load(..., stream=True)``
returns one when the runtime's ``max_memory`` is smaller than the model's weights.

Everything that touches weights goes through this module:

- :func:`calibration_pass` runs the calibration windows through the blocks. In memory: batch by batch through
  the whole model (hooks on every block). Streamed: the windows are embedded (the embedding read a chunk of
  rows at a time), each block's inputs are captured once from the model's own forward (its attention mask,
  position embeddings; a stand-in per block stops the forward before any weight is needed), then block by
  block — load it, run every window's activations through it, let the method read it, drop it. Per block and
  batch the arithmetic is the same as in memory, so statistics match bit for bit.
- :func:`each_block` yields the blocks with their weights loaded (data-free scorers).
- :func:`record` takes the plan ``apply`` would have applied (the skeleton gets the pruned shapes, so parameter
  accounting and configs work as usual) and :func:`save` applies it block by block while writing the output
  shards: each block is loaded, sliced, written and dropped; embeddings, norms and the head are copied a tensor
  at a time.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from pruneflow.model import arch as A
from pruneflow.model.arch import ArchSpec
from pruneflow.errors import PruneflowError
from pruneflow.execution.losses import run_blocks
from pruneflow.execution.runtime import Runtime
from pruneflow.sizes import format_size
from pruneflow.execution.losses import LOGIT_BYTES, hidden_nll
from pruneflow.data.corpus import sha256_file

EMBED_CHUNK_BYTES = 64 * 2**20  # rows of the embedding matrix read at a time for the lookup
READ_CHUNK_BYTES = 16 * 2**20  # a larger tensor is read this many bytes of rows at a time (see LazyWeights.read)
BATCH = 8  # calibration windows per forward, as in memory


# safetensors dtype names → torch dtypes (https://github.com/huggingface/safetensors, format: an 8-byte header
# length, a JSON header of {name: {dtype, shape, data_offsets}}, then the bytes)
STORED = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


READ = {"bytes": 0}  # bytes read from checkpoint files by this process (stage resources report the difference)


def count_read(nbytes: int) -> None:
    READ["bytes"] += nbytes


@dataclass
class TensorInfo:
    file: Path
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    offset: int = -1  # where its bytes start in the file (-1: unknown, read through safetensors)

    def nbytes(self, dtype: torch.dtype) -> int:
        return math.prod(self.shape) * dtype.itemsize


class LazyWeights:
    """The tensors of a safetensors checkpoint (one file or shards), read on demand; a file is opened for one
    read and closed again, so its memory map never holds more than what was just read."""

    def __init__(self, path: Path):
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise PruneflowError(f"{path} has no *.safetensors weights: streaming reads tensors lazily from "
                                 f"safetensors files (convert .bin/.pt checkpoints with save_pretrained first)")
        self.path = path
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:  # validates the file
                    for name in f.keys():
                        part = f.get_slice(name)
                        self.tensors[name] = TensorInfo(file, part.get_dtype(), tuple(part.get_shape()))
                for name, offset in _offsets(file).items():
                    self.tensors[name].offset = offset
            except (SafetensorError, OSError, ValueError, KeyError) as err:
                raise PruneflowError(f"{file} is not a readable safetensors file (truncated or corrupt?): "
                                     f"{err}") from err

    def nbytes(self, names, dtype: torch.dtype) -> int:
        return sum(self.tensors[n].nbytes(dtype) for n in names)

    def read(self, names: list[str], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """``names`` in ``dtype`` on ``device``; NaN/Inf is an error, as for a loaded checkpoint.

        The bytes are read with plain file reads, straight into the result when it is a CPU tensor of the stored
        dtype, else :data:`READ_CHUNK_BYTES` of rows at a time and converted: a memory-mapped read would keep
        every page it touched resident beside the copy until the file is closed (a 1 GB embedding held twice)."""
        missing = [n for n in names if n not in self.tensors]
        if missing:
            raise PruneflowError(f"checkpoint {self.path} lacks tensor(s) {', '.join(missing[:5])}")
        out = {}
        for name in names:
            info = self.tensors[name]
            stored = STORED.get(info.dtype)
            if info.offset < 0 or stored is None:  # a dtype this reader does not know: safetensors reads it
                with safe_open(info.file, framework="pt") as f:
                    tensor = f.get_tensor(name)
                count_read(tensor.numel() * tensor.element_size())
                out[name] = self._convert(tensor, dtype, device, name)
                continue
            target = dtype if stored.is_floating_point else stored
            whole = torch.empty(info.shape, dtype=target, device=device)
            direct = whole.device.type == "cpu" and target == stored
            rows = max(1, len(whole)) if not info.shape else info.shape[0]
            row_bytes = math.prod(info.shape[1:]) * stored.itemsize
            step = rows if direct else max(1, READ_CHUNK_BYTES // max(1, row_bytes))
            with open(info.file, "rb", buffering=0) as f:
                for start in range(0, rows, step):
                    stop = min(rows, start + step)
                    part = whole.view(-1) if not info.shape else whole[start:stop]
                    buffer = part if direct else torch.empty(part.shape, dtype=stored)
                    f.seek(info.offset + start * row_bytes)
                    _read_exactly(f, buffer.view(-1).view(torch.uint8).numpy(), info.file)
                    count_read(buffer.numel() * buffer.element_size())
                    if not direct:
                        part.copy_(buffer)
            out[name] = self._convert(whole, dtype, device, name)
        return out

    def _convert(self, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device, name: str) -> torch.Tensor:
        tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        if tensor.is_floating_point():
            for rows in tensor.view(-1).split(2**18):  # the check's temporaries (|x|, masks) stay small
                if not torch.isfinite(rows).all():
                    raise PruneflowError(f"checkpoint {self.path}: weight {name} contains NaN or Inf")
        return tensor

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Rows ``start:stop`` of ``name`` in ``dtype`` on ``device`` (plain file reads, as :meth:`read`)."""
        info = self.tensors[name]
        stored = STORED.get(info.dtype)
        if info.offset < 0 or stored is None:
            with safe_open(info.file, framework="pt") as f:
                part = f.get_slice(name)[start:stop]
            count_read(part.numel() * part.element_size())
            return part.to(device=device, dtype=dtype)
        stop = min(stop, info.shape[0])
        row_bytes = math.prod(info.shape[1:]) * stored.itemsize
        buffer = torch.empty((stop - start, *info.shape[1:]), dtype=stored)
        with open(info.file, "rb", buffering=0) as f:
            f.seek(info.offset + start * row_bytes)
            _read_exactly(f, buffer.view(-1).view(torch.uint8).numpy(), info.file)
        count_read(buffer.numel() * buffer.element_size())
        return buffer.to(device=device, dtype=dtype)


def _offsets(file: Path) -> dict[str, int]:
    """Where each tensor's bytes start in a safetensors file (from its JSON header)."""
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return {name: 8 + length + entry["data_offsets"][0] for name, entry in header.items() if name != "__metadata__"}


def _read_exactly(f, into, file: Path) -> None:
    view, done = memoryview(into).cast("B"), 0
    while done < len(view):
        count = f.readinto(view[done:])
        if not count:
            raise PruneflowError(f"{file} ends early (truncated?)")
        done += count


@dataclass
class Pending:
    """A plan recorded on a streamed model: the plan (its JSON goes into resume keys; ``kept_layers`` says which
    blocks are written) and how it slices dense block ``i`` in place (given by whoever applied it)."""
    plan: object
    slice: Callable[[nn.Module, int], None]

    @property
    def removes_layers(self) -> bool:
        kept = getattr(self.plan, "kept_layers", None)
        return kept is not None and len(kept) < len(self.plan.layers)


@dataclass
class Stream:
    """What a streamed skeleton needs to reach its weights."""
    weights: LazyWeights
    dense: nn.Module  # meta skeleton with the shapes of the weights on disk (the model itself gets pruned)
    dtype: torch.dtype  # compute dtype
    device: torch.device
    pending: list[Pending] = field(default_factory=list)  # recorded by apply, replayed per block and by save
    fitted: object | None = None  # blockwise.Fitted: re-fitted projections, applied after the plans


def stream_of(model: nn.Module) -> Stream | None:
    return getattr(model, "pruneflow_stream", None)


def is_streamed(model: nn.Module) -> bool:
    return stream_of(model) is not None


def skeleton(build: Callable, config, spec: ArchSpec, weights: LazyWeights, dtype: torch.dtype,
             device: torch.device) -> nn.Module:
    """``build(config, dtype=...)``'s model on the meta device, its buffers on ``device``, its weights read from
    ``weights`` when needed."""
    from accelerate import init_empty_weights

    if not spec.causal_lm:
        raise PruneflowError("streaming supports decoder language models; this is an encoder (small enough to "
                             "load: drop --max-memory)")
    with init_empty_weights(include_buffers=False):
        model = build(config, dtype=dtype)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != "meta":
                module._buffers[name] = buffer.to(device)
    model.eval()
    model.pruneflow_stream = Stream(weights=weights, dense=copy.deepcopy(model), dtype=dtype, device=device)
    return model


def _prefix(model: nn.Module, module: nn.Module) -> str:
    name = next(n for n, m in model.named_modules() if m is module)
    return f"{name}." if name else ""


def load_module(stream: Stream, module: nn.Module, prefix: str, tied: str | None = None) -> None:
    """Give a meta ``module`` its weights from disk (``prefix`` is its name in the checkpoint; a tensor the
    files lack is read as ``tied``, the input embedding a tied head shares)."""
    names = {n: prefix + n for n in module.state_dict()}
    names = {n: key if key in stream.weights.tensors or tied is None else tied for n, key in names.items()}
    tensors = stream.weights.read(list(dict.fromkeys(names.values())), stream.dtype, stream.device)
    module.load_state_dict({n: tensors[key] for n, key in names.items()}, assign=True, strict=True)


def offload(module: nn.Module) -> None:
    module.to("meta")


def current_block(model: nn.Module, spec: ArchSpec, i: int) -> nn.Module:
    """Block ``i`` as the model has it now, with its weights: the dense block read from disk, then sliced by
    every plan applied so far, in order (the same copies the in-memory path made)."""
    stream = stream_of(model)
    if any(pending.removes_layers for pending in stream.pending):
        raise PruneflowError("blocks of a streamed model whose layers were removed are only written (save)")
    block = dense_block(model, spec, i)
    for pending in stream.pending:
        pending.slice(block, i)
    if stream.fitted is not None:
        stream.fitted.install(block, spec, i)
    return block


def dense_block(model: nn.Module, spec: ArchSpec, i: int) -> nn.Module:
    """Block ``i`` of a streamed model as its files have it (before any plan)."""
    stream = stream_of(model)
    block = copy.deepcopy(A.blocks(stream.dense, spec)[i])
    load_module(stream, block, f"{spec.layers}.{i}.")
    return block


def each_block(model: nn.Module, spec: ArchSpec) -> Iterator[nn.Module]:
    """The blocks with their weights (streamed: loaded one at a time into the model, dropped when the caller
    moves on)."""
    blocks = A.blocks(model, spec)
    for i in range(len(blocks)):
        if not is_streamed(model):
            yield blocks[i]
            continue
        skeleton_block = blocks[i]
        blocks[i] = current_block(model, spec, i)
        try:
            yield blocks[i]
        finally:
            blocks[i] = skeleton_block


class _Stop(Exception):
    pass


class _Catch(nn.Module):
    """Stands in for block ``index`` during capture: records the arguments the model passes it."""

    def __init__(self, index: int, last: bool, record: dict, block: nn.Module):
        super().__init__()
        self.index, self.last, self.record = index, last, record
        if hasattr(block, "attention_type"):  # the model picks each block's mask by it (sliding windows)
            self.attention_type = block.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.record["hidden"] = hidden_states
        self.record.setdefault("calls", []).append((args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


def embed(model: nn.Module, stream: Stream, input_ids: torch.Tensor) -> torch.Tensor:
    """``embed_tokens(input_ids)`` with the embedding matrix read a chunk of rows at a time."""
    embedding = model.get_input_embeddings()
    name = _prefix(model, embedding) + "weight"
    vocab, width = embedding.num_embeddings, embedding.embedding_dim
    out = torch.empty(*input_ids.shape, width, dtype=stream.dtype, device=stream.device)
    step = max(1, EMBED_CHUNK_BYTES // (width * stream.dtype.itemsize))
    for start in range(0, vocab, step):
        inside = (input_ids >= start) & (input_ids < start + step)
        if inside.any():
            rows = stream.weights.rows(name, start, min(vocab, start + step), stream.dtype, stream.device)
            out[inside] = rows[input_ids[inside] - start]
    return out


class Lookup:
    """The embedding rows of every token id of a set of batches, read in one sweep over the embedding matrix
    rather than once per batch (Bonsai's sub-model batches and the search's candidates reuse the same windows; a
    128k × 4096 embedding is 1 GB a sweep). Holds one row per distinct id: at most the windows' own tokens."""

    def __init__(self, model: nn.Module, stream: Stream, batches: list[torch.Tensor]):
        self.ids = torch.unique(torch.cat([b.reshape(-1) for b in batches])).to(stream.device)  # sorted
        self.rows = embed(model, stream, self.ids)  # (distinct ids, hidden)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.rows[torch.searchsorted(self.ids, input_ids.to(self.ids.device))]


def lookup_for(model: nn.Module, batches: list[torch.Tensor]) -> Lookup | None:
    """A :class:`Lookup` for a streamed model's batches (None in memory: the embedding is there)."""
    stream = stream_of(model)
    return None if stream is None else Lookup(model, stream, batches)


def capture(model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor,
            lookup: Lookup | None = None) -> tuple[torch.Tensor, list[tuple]]:
    """(hidden states entering block 0, the (args, kwargs) every block is called with) for one batch (streamed
    or in memory; streamed, the embedding rows come from ``lookup`` when given)."""
    stream = stream_of(model)
    if stream is not None:
        embeds = lookup(input_ids) if lookup is not None else embed(model, stream, input_ids.to(stream.device))
    else:
        embedding = model.get_input_embeddings()
        embeds = embedding(input_ids.to(embedding.weight.device))
    blocks = A.blocks(model, spec)
    record: dict = {}
    A.set_blocks(model, spec, nn.ModuleList(_Catch(i, i == len(blocks) - 1, record, b) for i, b in enumerate(blocks)))
    try:
        backbone = getattr(model, model.base_model_prefix, model)  # an encoder is loaded as its base model
        backbone(inputs_embeds=embeds, use_cache=False)
    except _Stop:
        pass
    finally:
        A.set_blocks(model, spec, blocks)
    return record["hidden"], record["calls"]


def advance(block: nn.Module, i: int, states: list[torch.Tensor], carried: list[tuple],
            around: Callable | None = None) -> None:
    """Run every carried batch through block ``i`` (with the arguments :func:`capture` recorded for it), in
    place; ``around(k)`` is a context manager batch ``k`` runs under."""
    from contextlib import nullcontext

    for k, (_, calls) in enumerate(carried):
        args, kwargs = calls[i]
        with around(k) if around is not None else nullcontext():
            states[k] = _output(block(states[k], *args, **kwargs))


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


@torch.no_grad()
def calibration_pass(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, runtime: Runtime,
                     hooks: Callable[[int, nn.Module], list], done: Callable[[int, nn.Module], None] | None = None,
                     batch_size: int = BATCH, desc: str = "calibration forward") -> None:
    """Run ``windows`` through every block. ``hooks(i, block)`` registers what watches block ``i`` (returns the
    handles); ``done(i, block)`` runs once block ``i`` has seen every window, its weights still loaded."""
    blocks = A.blocks(model, spec)
    if not is_streamed(model):
        handles = [h for i, block in enumerate(blocks) for h in hooks(i, block)]
        try:
            for batch in runtime.batches(model, windows, batch_size, desc=desc):
                run_blocks(model, batch, spec.causal_lm)
        finally:
            for handle in handles:
                handle.remove()
        for i, block in enumerate(blocks):
            if done is not None:
                done(i, block)
        return
    batches = [windows[s:s + batch_size] for s in range(0, len(windows), batch_size)]
    lookup = lookup_for(model, batches)  # one sweep over the embedding for every batch
    carried = [capture(model, spec, batch, lookup) for batch in batches]
    del lookup
    states = [hidden for hidden, _ in carried]
    for i, block in enumerate(tqdm(each_block(model, spec), total=len(blocks), desc=f"{desc} (streamed)",
                                   unit="block", leave=False)):
        handles = hooks(i, block)
        try:
            advance(block, i, states, carried)
        finally:
            for handle in handles:
                handle.remove()
        if done is not None:
            done(i, block)
        runtime.release_host()


@torch.no_grad()
def token_nll_batches(model: nn.Module, spec: ArchSpec, batches: list[torch.Tensor], runtime: Runtime,
                      around: Callable | None = None, measure: Callable | None = None,
                      held: int = 0) -> Iterator[torch.Tensor]:
    """(B, T - 1) next-token NLL of each batch of input ids, in order, streamed: the batches go through the
    blocks a group at a time (as many as the budget carries beside a block or the head, at most a quarter
    of it: :func:`loss_group`; each group reads every block once),
    then the final norm and the head (loaded for it, dropped after) turn them into losses a chunk of tokens at
    a time. ``around(i, block, b)``: a context manager block ``i`` runs batch ``b`` under (e.g. masks);
    ``measure(head, hidden, b)``: what is yielded of batch ``b``'s final hidden states instead of its NLL (an
    objective's per-token measure; the head is None for an encoder). ``held``: bytes the caller keeps in the
    budget's memory meanwhile (an objective's reference on a CPU), which the groups leave room for."""
    stream = stream_of(model)
    backbone = getattr(model, model.base_model_prefix)
    widest = max(batches, key=lambda b: b.numel())
    group = loss_group(model, spec, runtime, *widest.shape, held=held)
    lookup = lookup_for(model, batches)  # the embedding read once for every group, not once per batch
    finals = [module for name, module in backbone.named_children()
              if module is not model.get_input_embeddings() and name != spec.layers.rpartition(".")[2]
              and any(True for _ in module.parameters())]  # the final norm
    head = model.get_output_embeddings()
    embedding = _prefix(model, model.get_input_embeddings()) + "weight"
    for start in range(0, len(batches), group):
        part = range(start, min(start + group, len(batches)))
        carried = [capture(model, spec, batches[b], lookup) for b in part]
        states = [hidden for hidden, _ in carried]
        for i, block in enumerate(each_block(model, spec)):
            advance(block, i, states, carried,
                    None if around is None else lambda k, i=i, block=block: around(i, block, part[k]))
            runtime.release_host()
        for module in (*finals, *([head] if head is not None else [])):
            load_module(stream, module, _prefix(model, module), tied=embedding)
        try:
            for b, hidden in zip(part, states):
                for module in finals:
                    hidden = module(hidden)
                yield (hidden_nll(head, hidden, batches[b].to(hidden.device)) if measure is None
                       else measure(head, hidden, b))
        finally:
            for module in (*finals, *([head] if head is not None else [])):
                offload(module)
        del carried, states


# ---- budget -------------------------------------------------------------------------------------------------

def block_bytes(weights: LazyWeights, spec: ArchSpec, count: int, dtype: torch.dtype) -> list[int]:
    names = [[n for n in weights.tensors if n.startswith(f"{spec.layers}.{i}.")] for i in range(count)]
    return [weights.nbytes(group, dtype) for group in names]


def required_bytes(weights: LazyWeights, config, spec: ArchSpec, dtype: torch.dtype, windows: int,
                   seqlen: int) -> dict[str, int]:
    """:func:`requirement` of the checkpoint ``weights`` holds."""
    converts = any((stored := STORED.get(info.dtype)) is None or (stored.is_floating_point and stored != dtype)
                   for info in weights.tensors.values())
    return requirement(block_bytes(weights, spec, config.num_hidden_layers, dtype), config, spec, dtype, windows,
                       seqlen, converts)


def requirement(blocks: list[int], config, spec: ArchSpec, dtype: torch.dtype, windows: int,
                seqlen: int, converts: bool = True, shard: int | None = None) -> dict[str, int]:
    """What a streamed prune holds at once (``blocks``: each block's bytes), in its largest phase:

    - while a tensor is read: its destination (counted in the phase) and, when its stored dtype is not ``dtype``
      (``converts``), one chunk of rows in the stored dtype (:data:`READ_CHUNK_BYTES`; see :meth:`LazyWeights.read`);
    - through the blocks: the largest block and its pruned copy (while it is written), the calibration
      activations of every window (carried from block to block) and one batch's work inside a block (the MLP's
      widest activations, attention scores);
    - through the head (losses: perplexity, sub-models, search candidates): the final norm and the LM head
      (vocabulary × hidden; a tied head is the embedding), the carried activations and one chunk of logits with
      its log-softmax (at most :data:`pruneflow.execution.losses.LOGIT_BYTES` of float32, ×2.5 with the head's own
      output);
    - capturing the inputs: one chunk of embedding rows and the carried activations;
    - saving: the largest tensor (the head), or a block and its sliced copy beside the pending shard (``shard``
      bytes, :func:`shard_limit`; by default a quarter of the smallest budget that holds it), each beside a chunk
      being read — the pending shard is written before a tensor that would not fit it.
    """
    carried = windows * seqlen * config.hidden_size * dtype.itemsize
    batch = min(windows, BATCH)
    inner = max(config.intermediate_size * 3, config.hidden_size * 4)
    work = batch * seqlen * inner * dtype.itemsize + batch * config.num_attention_heads * seqlen * seqlen * 4
    head = config.vocab_size * config.hidden_size * dtype.itemsize
    chunk = min(LOGIT_BYTES, batch * seqlen * config.vocab_size * 4)  # float32 logits of one chunk of tokens
    logits = int(2.5 * chunk) if spec.causal_lm else 0
    embed = min(head, EMBED_CHUNK_BYTES)
    reading = min(max(max(blocks), head), READ_CHUNK_BYTES) if converts else 0  # a read chunk, then converted
    block_save = 2 * max(blocks) + reading
    pending = shard if shard is not None else block_save // 3  # a quarter of a budget B = B / 4 + block_save
    phases = {"blocks": 2 * max(blocks) + carried + max(work, reading), "head": head + carried + max(logits, reading),
              "embedding": embed + 2 * carried, "save": max(head + reading, block_save + pending)}
    return {"block": max(blocks), "carried": carried, "work": work, "head": head, "logits": logits,
            "phases": phases, "total": max(phases.values())}


def shard_limit(max_shard: int, budget: int | None) -> int:
    """The most bytes a streamed save gathers before writing a shard: ``max_shard``, and at most a quarter of the
    memory budget (the pending shard shares it with the block being written)."""
    return min(max_shard, max(1, budget // 4)) if budget else max_shard


def check_budget(weights: LazyWeights, config, spec: ArchSpec, dtype: torch.dtype, budget: int, windows: int,
                 seqlen: int) -> None:
    need = required_bytes(weights, config, spec, dtype, windows, seqlen)
    if budget < need["total"]:
        raise PruneflowError(
            f"--max-memory {format_size(budget)} is too small to stream this model: one block "
            f"({format_size(need['block'])}) and its pruned copy with one batch's work "
            f"({format_size(need['work'])}), or the LM head ({format_size(need['head'])}) with a chunk of logits "
            f"({format_size(need['logits'])}), beside the activations of {windows} × {seqlen} tokens "
            f"({format_size(need['carried'])}), need at least {format_size(need['total'], up=True)}")


def loss_group(model: nn.Module, spec: ArchSpec, runtime: Runtime, rows: int, length: int, held: int = 0) -> int:
    """How many batches of ``rows`` × ``length`` tokens a loss pass carries through the blocks at once: what the
    budget, less ``held`` bytes kept meanwhile, leaves beside the larger of (a block, its copy and a batch's work)
    and (the head and a chunk of logits), and at most a quarter of the budget."""
    stream = stream_of(model)
    need = required_bytes(stream.weights, model.config, spec, stream.dtype, rows, length)
    fixed = max(2 * need["block"] + need["work"], need["head"] + need["logits"])
    budget = runtime.max_memory or 0
    return max(1, min(budget // 4, budget - held - fixed) // need["carried"])


# ---- apply and save -----------------------------------------------------------------------------------------

def record(model: nn.Module, plan, slice: Callable[[nn.Module, int], None]) -> None:
    """Take ``plan`` (relative to the model as it is now; ``slice(block, i)`` cuts dense block i to it) for the
    blocks loaded later and for :func:`write_weights`. The caller gives the skeleton its pruned shapes."""
    stream = stream_of(model)
    if any(pending.removes_layers for pending in stream.pending):
        raise PruneflowError("a plan that removes layers must be the last one applied to a streamed model")
    stream.pending.append(Pending(plan, slice))


def digest(model: nn.Module) -> bytes:
    """sha256 of the checkpoint files a streamed model reads (what its weights are), for resume keys."""
    import hashlib

    stream = stream_of(model)
    total = hashlib.sha256()
    for file in sorted({info.file for info in stream.weights.tensors.values()}):
        total.update(file.name.encode() + sha256_file(file).encode())
    for pending in stream.pending:
        total.update(pending.plan.to_json().encode())
    return total.digest()


class ShardWriter:
    """Tensors into safetensors shards of at most ``limit`` bytes, each written as soon as it is full; names and
    the index follow ``save_pretrained`` (``model.safetensors`` alone, else ``model-0000k-of-0000n`` + index)."""

    def __init__(self, out: Path, limit: int):
        self.out, self.limit = out, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def make_room(self, size: int) -> None:
        """Write the pending shard now if ``size`` more bytes would not fit it (call before reading them)."""
        if self.pending and sum(t.numel() * t.element_size() for t in self.pending.values()) + size > self.limit:
            self.flush()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        self.make_room(size)
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.total += size
        if size >= self.limit:  # a tensor as large as a shard is a shard of its own, written at once
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.out / f"shard-{len(self.files):05d}.part"
        save_file(self.pending, path, metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending = {}

    def close(self) -> None:
        self.flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for k, (path, names) in enumerate(self.files, 1):
            final = f"model-{k:05d}-of-{len(self.files):05d}.safetensors"
            path.rename(self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


@torch.no_grad()
def write_weights(model: nn.Module, spec: ArchSpec, out: Path, dtype: torch.dtype, shard_bytes: int,
                  runtime: Runtime | None = None) -> None:
    """Apply the recorded plans block by block and write the pruned weights in ``dtype`` to ``out``."""
    stream = stream_of(model)
    if not stream.pending:
        raise PruneflowError("nothing to save: no plan was applied to the streamed model")
    writer = ShardWriter(out, shard_bytes)
    prefix = f"{spec.layers}."
    for name in stream.weights.tensors:  # embeddings, norms, the head: copied a tensor at a time
        if not name.startswith(prefix):
            writer.make_room(stream.weights.tensors[name].nbytes(dtype))  # before the read, not after
            writer.add(name, stream.weights.read([name], dtype, torch.device("cpu"))[name])
    last = stream.pending[-1].plan
    kept = last.kept_layers if last.kept_layers is not None else list(range(len(last.layers)))
    for new_index, i in enumerate(tqdm(kept, desc=f"saving {out.name} (streamed)", unit="block", leave=False)):
        block = copy.deepcopy(A.blocks(stream.dense, spec)[i])
        load_module(stream, block, f"{prefix}{i}.")
        for pending in stream.pending:
            pending.slice(block, i)
        if stream.fitted is not None:
            stream.fitted.install(block, spec, i)
        for name, tensor in block.state_dict().items():
            writer.add(f"{prefix}{new_index}.{name}", tensor.to(dtype))
        del block
        if runtime is not None:
            runtime.release_host()
    writer.close()
