"""The method registry: one typed entry per importance method, one module per method under this package.

An entry says what a method needs (calibration activations, gradients, a causal LM, the target ratio), which
unit types it scores, what ``prune.allocation: auto`` means for it and its options model. It imports no torch:
validating params (``pruneflow run``, the Prefect form, ``pruneflow methods``) reads only the entries;
``Method.score`` imports the module on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from pruneflow.methods.options import BonsaiParams, ExpertDropParams, LacoParams, Options
from pruneflow.units import ALLOCATIONS, WIDTH_UNITS

ACTIVATIONS, GRADIENTS, CAUSAL_LM, RATIO = "activations", "gradients", "causal_lm", "ratio"
OBJECTIVE = "objective"  # scores candidate sub-models by ``score.objective`` (loss, kl, hidden: any architecture)
NORMS = "norms"  # reads the outputs of each block's norms (an ArchSpec that names them)


@dataclass(frozen=True)
class Method:
    name: str
    module: str  # the module of this package whose ``score`` it is
    summary: str
    units: tuple[str, ...] = WIDTH_UNITS  # unit types it scores
    needs: frozenset[str] = frozenset()  # ACTIVATIONS, GRADIENTS, CAUSAL_LM, RATIO, OBJECTIVE, NORMS
    allocation: str = "uniform"  # what prune.allocation: auto means for it
    allocations: tuple[str, ...] = ALLOCATIONS  # the allocations it supports
    reconstruct: str = "none"  # what prune.reconstruct: auto means for it
    iterative: bool = False  # scores one iteration; prune.py repeats score → select → apply
    options: type[Options] | None = None  # its options model, params key score.<name>
    streams: bool = False  # scores a model larger than memory a block at a time (runtime.max_memory)
    auto_units: tuple[str, ...] | None = None  # what prune.units: auto means for it (None: all of ``units``)
    expert_channels: bool = False  # also scores the MLP channels inside the experts of MoE models

    @property
    def score(self) -> Callable:
        return __getattr__("SCORERS")[self.name]

    @property
    def depth(self) -> bool:  # removes whole blocks (or, where it also scores them, sub-blocks)
        return "layers" in self.units and not self.widths

    @property
    def widths(self) -> bool:  # scores heads or MLP channels (the width units)
        return bool(set(self.units) & set(WIDTH_UNITS))

    @property
    def experts(self) -> bool:  # scores the experts of MoE models only
        return self.units == ("experts",)


# allocation and reconstruction defaults (``auto``): a method named after a paper does what that paper's code
# does — FLAP ranks globally (AL-AM) and compensates with a bias, LLM-Pruner's Taylor and Bonsai rank globally,
# Wanda-sp is uniform (FLAP's prune_wanda_sp); the controls (magnitude, random) are uniform
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("magnitude", "magnitude", "data-free: L2 norm of the weights a unit owns", streams=True,
           expert_channels=True),
    Method("random", "random_", "control: seeded uniform random scores", streams=True, expert_channels=True),
    Method("wanda_sp", "wanda_sp", "structured Wanda: mean |W| · ‖X‖₂ on o_proj/down_proj inputs",
           needs=frozenset({ACTIVATIONS}), streams=True, expert_channels=True),
    Method("flap", "flap", "FLAP: input fluctuation × ‖W[:, j]‖² (squared for heads), standardized per layer, "
           "ranked globally, bias compensation", needs=frozenset({ACTIVATIONS}), allocation="global",
           reconstruct="bias", streams=True, expert_channels=True),
    Method("taylor", "taylor", "LLM-Pruner's first-order Taylor |W ⊙ ∂L/∂W| (needs gradients)",
           needs=frozenset({ACTIVATIONS, GRADIENTS, CAUSAL_LM}), allocation="global"),
    Method("block_influence", "block_influence", "ShortGPT: 1 − cos(block input, block output), whole blocks "
           "(units: [subblocks]: each attention and MLP by the same measure)", units=("layers", "subblocks"),
           needs=frozenset({ACTIVATIONS}), allocation="global", streams=True, auto_units=("layers",)),
    Method("angular", "angular", "Gromov et al.: the contiguous run of blocks with the least angular change",
           units=("layers",), needs=frozenset({ACTIVATIONS, RATIO}), allocation="global", streams=True),
    Method("sleb", "sleb", "SLEB: greedily remove the block whose removal raises the calibration loss least",
           units=("layers",), needs=frozenset({ACTIVATIONS, OBJECTIVE, RATIO}), allocation="global"),
    Method("blockpruner", "blockpruner", "BlockPruner: greedily remove the attention or MLP sub-block whose "
           "removal raises the calibration loss least", units=("subblocks",),
           needs=frozenset({ACTIVATIONS, OBJECTIVE, RATIO}), allocation="global", allocations=("global",)),
    Method("laco", "laco", "LaCo: fold the blocks after a base block into it (parameter differences), top down, "
           "keeping a merge while the last hidden states keep their cosine to the dense model's",
           units=("merged_layers",), needs=frozenset({ACTIVATIONS, RATIO}), allocation="global",
           allocations=("global",), options=LacoParams),
    Method("bonsai", "bonsai", "Bonsai: importance from the losses of perturbed sub-models, forward passes only",
           needs=frozenset({ACTIVATIONS, OBJECTIVE}), allocation="global", allocations=("global",), iterative=True,
           options=BonsaiParams, streams=True),
    Method("minitron", "minitron", "Minitron: activation magnitude, mean |x| over the sequence then L2 over the "
           "batch, of the norm outputs (hidden), o_proj inputs (heads), down_proj inputs (channels)",
           units=("hidden", "heads", "channels"), needs=frozenset({ACTIVATIONS, NORMS}), allocations=("uniform",),
           auto_units=("hidden",)),  # hidden channels are sliced in memory: no streaming
    Method("router_weighted", "router_weighted", "experts (MoE): Σ over the tokens routed to an expert of gate weight "
           "× ‖its output‖₂ (router frequency × gate weight × output norm; MoE-Pruner's router hint per expert)",
           units=("experts",), needs=frozenset({ACTIVATIONS}), allocations=("uniform", "global")),
    Method("expert_drop", "expert_drop", "experts (MoE), \"Not All Experts are Equal\": per layer, the combination "
           "of experts whose removal changes the layer's output least (every combination evaluated)",
           units=("experts",), needs=frozenset({ACTIVATIONS, RATIO}), allocations=("uniform",),
           options=ExpertDropParams),
)}


def __getattr__(name: str):
    # SCORERS (name → score function) imports the method modules, and with them torch, on first use only
    if name == "SCORERS":
        if "SCORERS" in globals():
            return globals()["SCORERS"]
        scorers = {m.name: importlib.import_module(f"{__name__}.{m.module}").score for m in METHODS.values()}
        globals()["SCORERS"] = scorers
        return scorers
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
