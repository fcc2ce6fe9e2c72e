"""Forward-only weight reconstruction after structured removal (``prune.reconstruct``).

``bias``: FLAP's compensation — the removed input channels of o_proj / down_proj are replaced by their mean
contribution, a bias (:func:`pruneflow.units.apply._compensation`). Methods that do not compute input means
themselves get them from one calibration pass of the dense model (:func:`input_means`).

``lstsq``: block by block in order, with the blocks before it already pruned and re-fitted, the kept input
columns of o_proj and then down_proj are re-fitted so that they reproduce the *dense* model's o_proj / down_proj
outputs on the calibration windows:

    W' = argmin ‖X_p W'ᵀ − Y_d‖² + λ‖W' − W₀‖²   →   (G + λI) W'ᵀ = C + λW₀ᵀ,   G = X_pᵀX_p,  C = X_pᵀY_d

``X_p``: the pruned model's input to the projection (its kept columns, upstream blocks pruned), ``Y_d``: the dense
projection's output on the dense model's own activations (minus any bias the projection keeps), ``W₀``: the
kept columns of the dense weight. G and C are accumulated over every calibration token in the runtime's
accumulation dtype (float64) and solved by Cholesky. The damping follows GPTQ/SparseGPT's rule, λ = 1% of the
mean diagonal of G (not tuned on any text), and pulls the fit towards the dense weights where the calibration
data says little. o_proj is fitted first; down_proj is then fitted on the MLP inputs the re-fitted attention
produces. The config stays vanilla (no bias is added).

The target is the projection's own output, before the residual add, in every family. In a post-LN encoder
(BERT: ``attention.output.dense`` and ``output.dense``, each followed by dropout, the residual add and a
LayerNorm) that is the dense model's dense-layer output on its own activations: the LayerNorm then sees the sum it
would see densely wherever the fit is exact — the fit does not target the normalised output, whose scale the
LayerNorm removes anyway.

It works a block at a time in every case — the dense block and its pruned copy are the only weights it holds
beyond the model: in memory the block is sliced and re-fitted in place of the dense one; for a streamed model
the dense block is read from the files, the pruned one is the dense one sliced by the recorded plans, and the
re-fitted projections go to a temporary safetensors file per block that loading and saving apply. After an
iterative method (Bonsai) the dense blocks come from a temporary safetensors copy taken before its first
iteration (:class:`pruneflow.execution.blockwise.DenseBlocks`), read back one at a time. Which of these holds is
the execution layer's business (:func:`pruneflow.execution.blockwise.pairs`); the re-fit never asks.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager

import torch
from torch import nn

from pruneflow.model import arch as A
from pruneflow.execution import blockwise, streaming
from pruneflow.execution.blockwise import DenseBlocks
from pruneflow.model.arch import ArchSpec
from pruneflow.errors import PruneflowError
from pruneflow.selection.plan import PrunePlan
from pruneflow.execution.runtime import Runtime
from pruneflow.methods.inputs import stats_hooks
from pruneflow.selection.scores import Scores
from pruneflow.sizes import format_size
from pruneflow.units.apply import apply_block
from pruneflow.execution.lineage import note_changed

log = logging.getLogger(__name__)

DAMPING = 0.01  # λ = DAMPING · mean(diag G): GPTQ / SparseGPT's percdamp
PROJECTIONS = ("o", "down")


# ---- checks before any compute ------------------------------------------------------------------------------

def widest_fit(model: nn.Module, spec: ArchSpec) -> int:
    """The most input columns one re-fit can have: the widest o_proj or down_proj input of the dense model."""
    head_dim = A.geometry(model.config).head_dim
    return max(max(w["heads"] * head_dim, w["channels"]) for w in A.layer_widths(model, spec))


def check(model: nn.Module, spec: ArchSpec, windows: torch.Tensor | None, runtime: Runtime) -> None:
    """Refuse an lstsq reconstruction that would be under-determined (fewer calibration tokens than the columns
    of the widest Gram matrix) or that a streamed model's budget cannot hold."""
    if windows is None:
        raise PruneflowError("prune.reconstruct: lstsq needs calibration windows")
    need, (count, seqlen) = widest_fit(model, spec), windows.shape
    if count * seqlen < need:
        raise PruneflowError(
            f"prune.reconstruct: lstsq re-fits up to {need} input columns per projection from the calibration "
            f"tokens, and {count} × {seqlen} = {count * seqlen} are fewer: the fit would be under-determined; use "
            f"calibrate.n_windows ≥ {math.ceil(need / seqlen)} at seqlen {seqlen}, or reconstruct: bias or none")
    budget = blockwise.budget(model, runtime)
    if budget:
        need_bytes = solve_bytes(model, spec, need, count * seqlen)
        if need_bytes["total"] > budget:
            raise PruneflowError(
                f"prune.reconstruct: lstsq on this streamed model holds a dense and a pruned block "
                f"({format_size(need_bytes['blocks'])}), {format_size(need_bytes['states'])} of activations and "
                f"{format_size(need_bytes['solve'])} for the widest solve (Gram matrix and its Cholesky factor, "
                f"cross products, result); --max-memory {format_size(runtime.max_memory)} is too "
                f"small: at least {format_size(need_bytes['total'], up=True)} (or reconstruct: bias)")


def solve_bytes(model: nn.Module, spec: ArchSpec, columns: int, tokens: int) -> dict[str, int]:
    """What a streamed lstsq re-fit holds at once: a dense and a pruned block, the dense and pruned activations
    and down_proj's targets of every calibration token, and for the widest solve (``columns`` inputs, float64)
    XᵀX (damped in place) and its Cholesky factor (2 n²) and XᵀY, the damped right-hand side and the result
    (3 n·d)."""
    hidden, itemsize = model.config.hidden_size, blockwise.compute_dtype(model).itemsize
    blocks = blockwise.pair_bytes(model, spec)
    states = 3 * tokens * hidden * itemsize
    solve = (2 * columns * columns + 3 * columns * hidden) * 8
    return {"blocks": blocks, "states": states, "solve": solve, "total": blocks + states + solve}


# ---- bias: input means for methods that do not compute them --------------------------------------------------

@torch.no_grad()
def input_means(model: nn.Module, spec: ArchSpec, windows: torch.Tensor,
                runtime: Runtime) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per block, the mean input of o_proj and of down_proj over the calibration tokens (one forward pass)."""
    attn, mlp = [], []
    streaming.calibration_pass(model, spec, windows, runtime, stats_hooks(spec, runtime, attn, mlp),
                               desc="input means (bias)")
    return [s.mean.float().cpu() for s in attn], [s.mean.float().cpu() for s in mlp]


def with_means(scores: Scores, attn: list[torch.Tensor], mlp: list[torch.Tensor],
               kept: list[dict] | None, head_dim: int) -> Scores:
    """``scores`` carrying the dense means, indexed by the units the current model still has (``kept``: the
    original indices per layer that survive earlier iterations; None: the dense model)."""
    from dataclasses import replace

    if kept is not None:
        attn = [m[A.head_rows(k["kept_heads"], head_dim)] for m, k in zip(attn, kept)]
        mlp = [m[torch.tensor(k["kept_channels"], dtype=torch.long)] for m, k in zip(mlp, kept)]
    return replace(scores, attn_mean=attn, mlp_mean=mlp)


# ---- lstsq ----------------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


class Gram:
    """Σ XᵀX, Σ XᵀY and Σ‖Y‖² over tokens, in ``dtype`` on the activations' device, a chunk of rows at a time."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.xx, self.xy, self.yy, self.count = dtype, None, None, 0.0, 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        if self.xx is None:
            self.xx = torch.zeros(x.shape[1], x.shape[1], dtype=self.dtype, device=x.device)
            self.xy = torch.zeros(x.shape[1], y.shape[1], dtype=self.dtype, device=x.device)
        for xs, ys in zip(x.split(1024), y.split(1024)):
            xs, ys = xs.to(self.dtype), ys.to(device=x.device, dtype=self.dtype)
            self.xx += xs.T @ xs
            self.xy += xs.T @ ys
            self.yy = self.yy + (ys * ys).sum()  # stays on the device: no sync per chunk
        self.count += x.shape[0]

    def error(self, weight: torch.Tensor) -> float:
        """‖X Wᵀ − Y‖² / ‖Y‖² of an (out, in) weight on the accumulated tokens."""
        w, yy = weight.to(self.dtype), float(self.yy)
        sse = yy - 2 * float((w.T * self.xy).sum()) + float(((w @ self.xx) * w).sum())
        return max(sse, 0.0) / yy if yy > 0 else 0.0

    def solve(self, prior: torch.Tensor) -> torch.Tensor:
        """The ridge fit pulled towards ``prior`` (out, in); returns (out, in) in the accumulation dtype."""
        w0 = prior.to(self.dtype)
        scale = float(self.xx.diagonal().mean())
        if scale <= 0:  # every input column is zero on the calibration data: nothing to fit
            return w0
        damp = DAMPING * scale
        rhs = self.xy + damp * w0.T
        self.xx.diagonal().add_(damp)  # XᵀX + damp·I in place: the Gram matrix and its factor, no other n × n
        try:
            chol, info = torch.linalg.cholesky_ex(self.xx)
            if int(info) == 0:
                return torch.cholesky_solve(rhs, chol).T
            del chol
            return torch.linalg.solve(self.xx, rhs).T
        finally:
            self.xx.diagonal().sub_(damp)


@contextmanager
def _hooked(module: nn.Module, pre=None, post=None):
    handles = []
    if pre is not None:
        handles.append(module.register_forward_pre_hook(pre))
    if post is not None:
        handles.append(module.register_forward_hook(post))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run_until(block: nn.Module, module: nn.Module, state: torch.Tensor, call, gram: Gram, target) -> None:
    """Run ``block`` on ``state`` until ``module`` is reached; add its input and ``target`` to ``gram``."""
    def pre(_module, args):
        gram.add(args[0], target)
        raise _Stop

    args, kwargs = call
    with _hooked(module, pre=pre):
        try:
            block(state, *args, **kwargs)
        except _Stop:
            pass


def _target(output: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """What the kept columns must produce: the dense output less the bias the pruned projection keeps."""
    return output if module.bias is None else output - module.bias


@torch.no_grad()
def _fit_block(dense: nn.Module, pruned: nn.Module, i: int, spec: ArchSpec, dense_states: list,
               pruned_states: list, carried: list, runtime: Runtime) -> dict:
    """Re-fit block ``i``'s pruned o_proj then down_proj in place; advance both activation sets."""
    outputs: dict[str, list] = {name: [] for name in PROJECTIONS}
    report = {}
    dense_mods = {name: A.get(dense, getattr(spec, name)) for name in PROJECTIONS}
    pruned_mods = {name: A.get(pruned, getattr(spec, name)) for name in PROJECTIONS}
    grams = {"o": Gram(runtime.accum_dtype)}
    for k, (_, calls) in enumerate(carried):
        caught = {}
        hooks = [dense_mods[n].register_forward_hook(lambda _m, _a, out, n=n: caught.__setitem__(n, out))
                 for n in PROJECTIONS]
        try:
            dense_states[k] = streaming._output(dense(dense_states[k], *calls[i][0], **calls[i][1]))
        finally:
            for handle in hooks:
                handle.remove()
        outputs["down"].append(caught["down"])
        _run_until(pruned, pruned_mods["o"], pruned_states[k], calls[i], grams["o"],
                   _target(caught["o"], pruned_mods["o"]))
    for name in PROJECTIONS:
        module = pruned_mods[name]
        if name == "down":
            grams["down"] = Gram(runtime.accum_dtype)
            for k, (_, calls) in enumerate(carried):
                _run_until(pruned, module, pruned_states[k], calls[i], grams["down"],
                           _target(outputs["down"][k], module))
            outputs["down"].clear()
        before = grams[name].error(module.weight)
        fitted = grams[name].solve(module.weight)
        module.weight.copy_(fitted.to(module.weight.dtype))
        report[name] = {"columns": module.in_features, "error_before": before,
                        "error_after": grams[name].error(module.weight)}
        grams[name] = None
    for k, (_, calls) in enumerate(carried):
        pruned_states[k] = streaming._output(pruned(pruned_states[k], *calls[i][0], **calls[i][1]))
    return report


@torch.no_grad()
def refit(model: nn.Module, spec: ArchSpec, plan: PrunePlan, scores: Scores | None, windows: torch.Tensor,
          runtime: Runtime, dense: DenseBlocks | None = None) -> list[dict]:
    """Make ``model`` what ``plan`` keeps, with o_proj/down_proj re-fitted (see the module docstring).

    In memory, with ``dense`` None: the model is still dense and each block is sliced here (``apply`` is not
    called). In memory with ``dense`` (an iterative method: the model is already pruned): ``dense`` are the
    dense blocks, and the model's blocks are re-fitted in place. Streamed: the plan(s) are recorded already;
    the dense blocks are read from the files. Returns a per-block report (relative error before/after).
    """
    from tqdm import tqdm

    note_changed(model, "its o_proj/down_proj were re-fitted by least squares")
    head_dim = A.geometry(model.config).head_dim
    kept = set(range(len(plan.layers)) if plan.kept_layers is None else plan.kept_layers)
    batch = streaming.BATCH
    batches = [windows[s:s + batch] for s in range(0, len(windows), batch)]
    lookup = streaming.lookup_for(model, batches)
    carried = [streaming.capture(model, spec, b, lookup) for b in batches]
    del lookup
    dense_states = [hidden for hidden, _ in carried]
    pruned_states = [hidden.clone() for hidden in dense_states]
    reports = []
    walk = blockwise.pairs(model, spec, len(plan.layers), kept,
                           lambda block, i: apply_block(block, spec, plan, scores, i, head_dim), dense)
    for pair in tqdm(walk, total=len(plan.layers), desc="lstsq reconstruction", unit="block", leave=False):
        i = pair.index
        if pair.pruned is None:  # a removed block: the pruned activations skip it
            streaming.advance(pair.dense, i, dense_states, carried)
            continue
        report = _fit_block(pair.dense, pair.pruned, i, spec, dense_states, pruned_states, carried, runtime)
        reports.append({"layer": i, **report})
        log.debug("lstsq block %d: o_proj error %.4f → %.4f, down_proj %.4f → %.4f", i,
                  report["o"]["error_before"], report["o"]["error_after"], report["down"]["error_before"],
                  report["down"]["error_after"])
        pair.keep({name: A.get(pair.pruned, getattr(spec, name)).weight for name in PROJECTIONS})
        del pair
        runtime.release_host()
    return reports
