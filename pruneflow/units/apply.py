"""Apply a PrunePlan: physically slice every block's projections so the model is genuinely smaller."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from pruneflow.model import arch as A
from pruneflow import units
from pruneflow.execution import streaming
from pruneflow.execution.lineage import note_applied
from pruneflow.model.arch import ArchSpec
from pruneflow.errors import PruneflowError
from pruneflow.model.modeling_pruneflow import resize_block
from pruneflow.selection.plan import LayerPlan, LayerShape, PrunePlan
from pruneflow.execution import runtime as R  # R.accum_dtype: looked up at call time (tests simulate a device)
from pruneflow.selection.scores import Scores


def layer_shapes(model: nn.Module, spec: ArchSpec) -> list[LayerShape]:
    """Widths and exact per-unit parameter costs (biases included) of every block."""
    geo = A.geometry(model.config)
    shapes = []
    for block, w in zip(A.blocks(model, spec), A.layer_widths(model, spec)):
        bias = {name: int(A.get(block, path).bias is not None)
                for name, path in (("q", spec.q), ("k", spec.k), ("gate", spec.gate), ("up", spec.up)) if path}
        in_rows = 2 if spec.gate else 1
        shape = LayerShape(
            heads=w["heads"], kv_heads=w["kv_heads"], channels=w["channels"], hidden=geo.hidden,
            head_cost=geo.head_dim * (2 * geo.hidden + bias["q"]),
            kv_cost=2 * geo.head_dim * (geo.hidden + bias["k"]),
            channel_cost=in_rows * geo.hidden + bias["up"] + bias.get("gate", 0) + geo.hidden,
            o_bias=w["o_bias"], down_bias=w["down_bias"])
        block_params = sum(p.numel() for p in block.parameters())
        shapes.append(replace(shape, fixed_cost=block_params - shape.block_cost))
    return shapes


def _check(plan: PrunePlan, shapes: list[LayerShape]) -> None:
    if len(plan.layers) != len(shapes):
        raise PruneflowError(f"plan has {len(plan.layers)} layers, the model has {len(shapes)}")
    whole = "subblocks" in plan.units  # only the sub-block unit removes a block's whole attention or MLP
    for i, (layer, shape) in enumerate(zip(plan.layers, shapes)):
        heads, kv = len(layer.kept_heads), len(layer.kept_kv_heads)
        if (not heads or not kv or not layer.kept_channels) and not whole:
            raise PruneflowError(f"plan empties layer {i}'s attention or MLP")
        if bool(heads) != bool(kv):
            raise PruneflowError(f"plan layer {i} keeps query heads without KV heads or the reverse")
        if heads and (heads % kv or any(h // shape.group_size not in layer.kept_kv_heads for h in layer.kept_heads)):
            raise PruneflowError(f"plan layer {i}: kept query heads do not form equal groups of kept KV heads")
        if max(layer.kept_channels, default=-1) >= shape.channels or max(layer.kept_heads, default=-1) >= shape.heads:
            raise PruneflowError(f"plan layer {i} keeps units the model does not have")


def _compensation(weight: torch.Tensor, kept: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Bias replacing removed input channels by their mean contribution: W[:, removed] @ mean[removed], in the
    accumulation dtype on the weight's device."""
    dtype = R.accum_dtype(weight.device)
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[kept.to(weight.device)] = False
    return weight[:, removed].to(dtype) @ mean.to(device=weight.device, dtype=dtype)[removed]


def block_widths(block: nn.Module, spec: ArchSpec, layer: LayerPlan, o_bias: bool, down_bias: bool) -> dict:
    """The widths ``layer`` leaves ``block`` with; ``o_bias``/``down_bias``: a compensation bias is added."""
    return {"heads": len(layer.kept_heads), "kv_heads": len(layer.kept_kv_heads), "channels": len(layer.kept_channels),
            "o_bias": A.get(block, spec.o).bias is not None or o_bias,
            "down_bias": A.get(block, spec.down).bias is not None or down_bias}


def compensated(block: nn.Module, spec: ArchSpec, layer: LayerPlan, plan: PrunePlan,
                head_dim: int) -> tuple[bool, bool]:
    """Whether ``plan`` adds a compensation bias to the block's o_proj / down_proj: only where it removes units."""
    heads_cut = len(layer.kept_heads) < A.get(block, spec.q).out_features // head_dim
    channels_cut = len(layer.kept_channels) < A.get(block, spec.up).out_features
    bias = plan.reconstruct == "bias"
    return bias and heads_cut, bias and channels_cut


@torch.no_grad()
def _apply_block(block: nn.Module, spec: ArchSpec, layer: LayerPlan, head_dim: int,
                 attn_mean: torch.Tensor | None, mlp_mean: torch.Tensor | None) -> None:
    old = {name: A.get(block, path) for name, path in spec.to_dict().items()
           if name in ("q", "k", "v", "o", "gate", "up", "down") and path}
    q_rows = A.head_rows(layer.kept_heads, head_dim)
    kv_rows = A.head_rows(layer.kept_kv_heads, head_dim)
    channels = torch.tensor(layer.kept_channels, dtype=torch.long)
    o_extra = _compensation(old["o"].weight, q_rows, attn_mean) if attn_mean is not None else None
    down_extra = _compensation(old["down"].weight, channels, mlp_mean) if mlp_mean is not None else None
    resize_block(block, spec.to_dict(), block_widths(block, spec, layer, o_extra is not None, down_extra is not None),
                 head_dim)
    rows = {"q": q_rows, "k": kv_rows, "v": kv_rows, "gate": channels, "up": channels}
    for name, index in rows.items():
        if name in old:
            new = A.get(block, getattr(spec, name))
            index = index.to(new.weight.device)
            new.weight.copy_(old[name].weight[index])
            if new.bias is not None:
                new.bias.copy_(old[name].bias[index])
    for name, index, extra in (("o", q_rows, o_extra), ("down", channels, down_extra)):
        new = A.get(block, getattr(spec, name))
        new.weight.copy_(old[name].weight[:, index.to(new.weight.device)])
        if new.bias is not None:
            dtype = R.accum_dtype(new.bias.device)
            bias = old[name].bias.to(dtype) if old[name].bias is not None else \
                torch.zeros(new.out_features, dtype=dtype, device=new.bias.device)
            new.bias.copy_(bias + (extra if extra is not None else 0))


def apply_block(block: nn.Module, spec: ArchSpec, plan: PrunePlan, scores: Scores | None, i: int,
                head_dim: int) -> None:
    """Slice block ``i`` to what ``plan`` keeps of it (with its compensation bias)."""
    layer = plan.layers[i]
    o_bias, down_bias = compensated(block, spec, layer, plan, head_dim)
    _apply_block(block, spec, layer, head_dim, scores.attn_mean[i] if o_bias else None,
                 scores.mlp_mean[i] if down_bias else None)


def apply(model: nn.Module, plan: PrunePlan, spec: ArchSpec, scores: Scores | None = None) -> nn.Module:
    """Slice the model in place to what ``plan`` keeps; with ``plan.reconstruct == "bias"``, add FLAP's bias
    compensation (``lstsq`` re-fits after slicing: :func:`pruneflow.units.reconstruct.refit`)."""
    note_applied(model, plan, scores)  # replicas on workers replay it (pruneflow.execution.replicas)
    units.holding(plan).apply_plan(model, spec, plan, scores)  # the unit that wrote the plan removes itself
    return model


def slice_blocks(model: nn.Module, plan: PrunePlan, spec: ArchSpec, scores: Scores | None = None) -> None:
    """The block slicer (the ``blocks`` unit's removal): every block to the widths ``plan`` keeps of it, with
    FLAP's bias compensation for ``reconstruct: bias``, then the blocks it removes whole; a streamed model's
    weights are sliced as they are written."""
    shapes = layer_shapes(model, spec)
    _check(plan, shapes)
    if plan.reconstruct == "bias" and (scores is None or scores.attn_mean is None):
        raise PruneflowError(f"method {plan.method!r} provides no activation means for bias compensation")
    head_dim = A.geometry(model.config).head_dim
    if streaming.is_streamed(model):  # the weights are sliced while they are written (streaming.write_weights)
        streaming.record(model, plan, lambda block, i: apply_block(block, spec, plan, scores, i, head_dim))
        for block, layer in zip(A.blocks(model, spec), plan.layers):  # the skeleton gets the pruned shapes
            widths = block_widths(block, spec, layer, *compensated(block, spec, layer, plan, head_dim))
            resize_block(block, spec.to_dict(), widths, head_dim)
        if plan.kept_layers is not None and len(plan.kept_layers) < len(shapes):
            remove_layers(model, spec, plan.kept_layers)
        return
    for i, block in enumerate(A.blocks(model, spec)):
        apply_block(block, spec, plan, scores, i, head_dim)
    if plan.kept_layers is not None and len(plan.kept_layers) < len(shapes):
        remove_layers(model, spec, plan.kept_layers)


def remove_layers(model: nn.Module, spec: ArchSpec, kept: list[int]) -> None:
    """Drop whole blocks, renumber ``layer_idx`` (KV-cache slots) and shorten the config's per-layer lists."""
    old_count = len(A.blocks(model, spec))
    blocks = nn.ModuleList(A.blocks(model, spec)[i] for i in kept)
    A.set_blocks(model, spec, blocks)
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = len(kept)
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == old_count and key != "pruneflow_layers":
            setattr(config, key, [value[i] for i in kept])  # e.g. layer_types
