"""Block by block, each dense block beside its pruned copy: what a re-fit (``prune.reconstruct: lstsq``) walks.

:func:`pairs` yields, for every block of a model a plan is pruning, the dense block and the pruned one (None where
the plan removes the block); the caller re-fits the pruned block's weights and hands back the ones it changed
(:meth:`Pair.keep`). Where they come from and where the result goes is this module's business:

- in memory, the model still dense: the dense block is the model's, the pruned one a sliced copy that replaces
  it; removed blocks leave the model at the end;
- in memory after an iterative method (the model already pruned): the dense blocks come from the copy on disk
  taken before its first iteration (:class:`DenseBlocks`, :func:`dense_copy`), the pruned ones are the model's;
- streamed: the dense block is read from the files, the pruned one is it sliced by the recorded plans, and the
  weights handed back go to a temporary safetensors file per block (:class:`Fitted`) that every later load and
  the save apply.

At most one dense and one pruned block are held beside the model (:func:`pair_bytes`).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pruneflow.model import arch as A
from pruneflow.units.apply import remove_layers
from pruneflow.model.arch import ArchSpec
from pruneflow.execution import streaming
from pruneflow.execution.runtime import Runtime


class Fitted:
    """Re-fitted weights of a streamed model's blocks (a spec name → weight per block), a safetensors file per
    block in a temporary directory removed with this object, applied after the recorded plans whenever a block
    is loaded (:func:`streaming.current_block`, the save)."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="pruneflow-lstsq-")
        self.blocks: set[int] = set()

    def put(self, i: int, weights: dict[str, torch.Tensor]) -> None:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, self._path(i))
        self.blocks.add(i)

    def install(self, block: nn.Module, spec: ArchSpec, i: int) -> None:
        if i not in self.blocks:
            return
        for name, tensor in load_file(self._path(i)).items():
            weight = A.get(block, getattr(spec, name)).weight
            weight.data = tensor.to(device=weight.device, dtype=weight.dtype)

    def _path(self, i: int) -> str:
        return str(Path(self._dir.name) / f"block{i}.safetensors")


class DenseBlocks:
    """The dense blocks of an in-memory model, kept on disk while an iterative method prunes it (a safetensors
    file per block in a temporary directory, removed with this object; a structure-only copy on the meta
    device): holding them in memory would need the weights twice. ``blocks[i]`` reads block ``i`` back, on
    the CPU."""

    def __init__(self, model: nn.Module, spec: ArchSpec):
        self._dir = tempfile.TemporaryDirectory(prefix="pruneflow-dense-")
        self.skeletons = []
        for i, block in enumerate(A.blocks(model, spec)):
            tensors = dict(block.named_parameters()) | dict(block.named_buffers())
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, self._path(i))
            self.skeletons.append(copy.deepcopy(block).to("meta"))

    def __len__(self) -> int:
        return len(self.skeletons)

    def __getitem__(self, i: int) -> nn.Module:
        block = copy.deepcopy(self.skeletons[i]).to_empty(device="cpu")
        stored = load_file(self._path(i))
        for name, tensor in (*block.named_parameters(), *block.named_buffers()):
            tensor.data.copy_(stored[name])
        return block

    def _path(self, i: int) -> str:
        return str(Path(self._dir.name) / f"block{i}.safetensors")


def dense_copy(model: nn.Module, spec: ArchSpec) -> DenseBlocks | None:
    """What :func:`pairs` needs later to see the dense blocks of a model about to be pruned in several steps: a
    copy on disk (None for a streamed model, whose dense blocks stay in its files)."""
    if streaming.is_streamed(model):
        return None
    return DenseBlocks(model, spec)


@dataclass
class Pair:
    index: int
    dense: nn.Module
    pruned: nn.Module | None  # None: the plan removes this block
    keep: Callable[[dict[str, torch.Tensor]], None]  # the weights the caller changed in ``pruned`` (spec names)


def pairs(model: nn.Module, spec: ArchSpec, n_blocks: int, kept: set[int],
          slice_block: Callable[[nn.Module, int], None], dense: DenseBlocks | None = None) -> Iterator[Pair]:
    """Each of the dense model's ``n_blocks`` blocks in order as a :class:`Pair` (see the module docstring);
    ``kept``: the blocks the plan keeps; ``slice_block(block, i)`` slices a dense block in place as the plan
    does (in memory, the model still dense); ``dense``: :func:`dense_copy`'s copy after an iterative method."""
    stream = streaming.stream_of(model)
    blocks = A.blocks(model, spec)
    if stream is not None:
        stream.fitted = stream.fitted or Fitted()
    for i in range(n_blocks):
        if stream is not None:
            yield Pair(i, streaming.dense_block(model, spec, i),
                       streaming.current_block(model, spec, i) if i in kept else None,
                       lambda weights, i=i: stream.fitted.put(i, weights))
        elif dense is None:
            pruned = None
            if i in kept:
                pruned = copy.deepcopy(blocks[i])
                slice_block(pruned, i)

            def replace(_weights, i=i, pruned=pruned):
                blocks[i] = pruned

            yield Pair(i, blocks[i], pruned, replace)
        else:
            yield Pair(i, dense[i].to(next(blocks[i].parameters()).device), blocks[i], lambda _weights: None)
    if stream is None and dense is None and len(kept) < n_blocks:
        remove_layers(model, spec, sorted(kept))


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the blocks compute in (a streamed skeleton's weights are not loaded: its stream says)."""
    stream = streaming.stream_of(model)
    return stream.dtype if stream is not None else next(model.parameters()).dtype


def pair_bytes(model: nn.Module, spec: ArchSpec) -> int:
    """The most a pair holds: twice the largest dense block, in the dtype the model computes in."""
    stream = streaming.stream_of(model)
    if stream is not None:
        sizes = streaming.block_bytes(stream.weights, spec, len(A.blocks(stream.dense, spec)), stream.dtype)
        return 2 * max(sizes)
    return 2 * max(sum(p.numel() * p.element_size() for p in block.parameters()) for block in A.blocks(model, spec))


def budget(model: nn.Module, runtime: Runtime) -> int | None:
    """The memory budget block-by-block work on ``model`` must fit beside the blocks it holds: ``--max-memory``
    for a streamed model (nothing else is resident), None in memory (the model was placed whole)."""
    return runtime.max_memory if streaming.is_streamed(model) else None
