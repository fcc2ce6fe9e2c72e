"""The numeric core on a device without float64 (Apple's MPS has none), simulated on the CPU.

A dispatch mode tracks which tensors live "on the device": the model's weights and everything computed from
them, until code brings a tensor to the host with ``.cpu()``. Any float64 tensor on the device raises, as MPS
does, and the runtime's accumulation dtype is float32, as it is on MPS. Each method, the search, the lstsq
re-fit and evaluation then run end to end: a path that computes in float64 on the device fails here, without a
Mac.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import tiny_causal_lm, tiny_moe
from pruneflow.model import arch as A
from pruneflow.execution import runtime as runtime_module
from pruneflow.pipeline.params import PruneParams
from pruneflow.prune import prune

WINDOWS = torch.randint(0, 256, (24, 16), generator=torch.Generator().manual_seed(0))


class DeviceWithoutFloat64(TorchDispatchMode):
    """Tensors computed from a device tensor are on the device; ``.cpu()`` (patched while the mode is on) gives
    a host copy. A float64 tensor on the device is an error, like MPS's "Cannot convert a MPS Tensor to
    float64 dtype"."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def __enter__(self):
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            tensor._on_device = True
        self._cpu = torch.Tensor.cpu
        torch.Tensor.cpu = _to_host
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.cpu = self._cpu
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(getattr(t, "_on_device", False) for t in inputs):
            for tensor in (t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)):
                if tensor.dtype == torch.float64:
                    raise TypeError(f"{func}: a float64 tensor on a device without float64")
                tensor._on_device = True
        return out


def _to_host(self, *args, **kwargs):
    with torch.utils._python_dispatch._disable_current_modes():
        host = self.clone()
    host._on_device = False
    return host


@pytest.fixture
def no_float64(monkeypatch):
    """The mode, with every device accumulating in what the runtime chooses for MPS."""
    mps_choice = runtime_module.accum_dtype(torch.device("mps"))
    monkeypatch.setattr(runtime_module, "accum_dtype", lambda device: mps_choice)
    return DeviceWithoutFloat64


def test_the_simulated_device_refuses_float64_and_the_host_takes_it(no_float64):
    model = tiny_causal_lm()
    with no_float64(model):
        with pytest.raises(TypeError, match="float64 tensor on a device"):
            model.lm_head.weight.sum().double()
        host = model.lm_head.weight.sum().cpu().double()  # brought to the host first: allowed
    assert host.dtype == torch.float64


@pytest.mark.parametrize("method, overrides", [
    ("flap", {}), ("wanda_sp", {"allocation": "search", "search": {"budget": 3, "windows": 2, "offspring": 2}}),
    ("flap", {"reconstruct": "lstsq"}), ("bonsai", {}), ("taylor", {}), ("block_influence", {"units": ["layers"]}),
    ("sleb", {"units": ["layers"]}), ("minitron", {"units": ["hidden"]})])
def test_methods_search_and_reconstruction_run_without_float64_on_the_device(no_float64, method, overrides):
    from pruneflow.methods import METHODS
    from pruneflow.pipeline.params import BonsaiParams

    model = tiny_causal_lm(num_hidden_layers=3)
    options = BonsaiParams(preset="fast", sub_models=4, n_windows=2, rows_per_forward=4, tolerance=0.05) \
        if method == "bonsai" else None
    assert method in METHODS
    with no_float64(model):
        result = prune(model, A.arch_for("llama"), method, PruneParams(ratio=0.3, **overrides), WINDOWS,
                       options=options)
    assert result.plan.params["non_embedding_after"] < result.plan.params["non_embedding_before"]


@pytest.mark.parametrize("method, units", [("expert_drop", ["experts"]), ("router_weighted", ["experts"]),
                                           ("flap", ["channels"]), ("wanda_sp", ["channels"])])
def test_moe_methods_run_without_float64_on_the_device(no_float64, method, units):
    model = tiny_moe("qwen3_moe", num_hidden_layers=2)
    cfg = PruneParams(ratio=0.2, units=units, allocation="uniform", reconstruct="none")
    with no_float64(model):
        prune(model, A.arch_for("qwen3_moe"), method, cfg, WINDOWS)


def test_perplexity_runs_without_float64_on_the_device(no_float64):
    from pruneflow.evaluation.evaluate import perplexity

    model = tiny_causal_lm()
    expected = perplexity(model, WINDOWS.reshape(-1), 16)
    with no_float64(model):
        assert perplexity(model, WINDOWS.reshape(-1), 16) == pytest.approx(expected, rel=1e-6)
