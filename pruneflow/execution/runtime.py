"""Where and how models run: one object owns the device, the dtype, how a model is placed and its peak memory.

Methods, evaluation and recovery take a :class:`Runtime` instead of choosing devices themselves: inputs go to
``runtime.input_device(model)``, statistics accumulate in ``runtime.accum_dtype`` on the device that produced
them, timings call ``runtime.synchronize()``. ``checkpoint.load`` asks it how to place a model: on one device,
or spread over several GPUs with accelerate's ``device_map="auto"`` when one GPU cannot hold it.
"""

from __future__ import annotations

import gc
import logging
import re
import resource
import sys
from dataclasses import dataclass, field

import torch

from pruneflow.errors import PruneflowError
from pruneflow.execution import DEVICE_WORDS, WORKERS, WORKERS_WORDS
from pruneflow.sizes import format_size, parse_size

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# a model is spread over several GPUs when its weights exceed this share of one GPU's free memory: the rest
# is left for activations, the KV cache and statistics
WEIGHTS_SHARE = 0.85


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a clear error when the
    device asked for is not there."""
    name = (name or "auto").strip()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise PruneflowError(f"device {name!r} is not a device; use {DEVICE_WORDS}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            reason = ("this torch build has no CUDA support" if torch.version.cuda is None
                      else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES?)")
            raise PruneflowError(f"device {name!r}: {reason}; use --device cpu or auto")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise PruneflowError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise PruneflowError(f"device {name!r}: MPS (Apple GPU) is not available here; use --device cpu or auto")
        return device
    if device.type == "cpu":
        return torch.device("cpu")
    raise PruneflowError(f"device {name!r} is not supported; use {DEVICE_WORDS}")


def check_workers(value: str) -> str:
    """``local`` | N | ``auto`` | ``ray://HOST:PORT`` (where candidates are evaluated), or a clear error."""
    value = str(value).strip()
    if not re.match(WORKERS, value):
        raise PruneflowError(f"--workers {value!r}: use {WORKERS_WORDS}")
    return value


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_dtype(name: str | None) -> torch.dtype | None:
    """``auto`` (None: each checkpoint's own dtype) or one of :data:`DTYPES`."""
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise PruneflowError(f"dtype {name!r} is not supported; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class Runtime:
    """The device models run on, the dtype they compute in (None: the checkpoint's own) and the memory budget
    for model weights (None: the whole model is loaded; smaller than the model: it is streamed a block at a
    time, see :mod:`pruneflow.execution.streaming`)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype | None = None
    max_memory: int | None = None
    workers: str = "local"  # where candidates are evaluated: here, or Ray workers (pruneflow.execution.replicas)

    @classmethod
    def create(cls, device: str = "auto", dtype: str | None = "auto",
               max_memory: str | int | None = None, workers: str = "local") -> "Runtime":
        workers = check_workers(workers)
        if workers != "local":
            import importlib.util

            if importlib.util.find_spec("ray") is None:
                raise PruneflowError(f"--workers {workers} needs Ray, which is not installed: "
                                     f"pip install 'pruneflow[ray]' (or use --workers local)")
        return cls(device=resolve_device(device), dtype=resolve_dtype(dtype), max_memory=parse_size(max_memory),
                   workers=workers)

    @classmethod
    def from_params(cls, params) -> "Runtime":
        """From params.yaml's ``runtime`` section."""
        return cls.create(params.device, params.dtype, params.max_memory, params.workers)

    def __str__(self) -> str:
        budget = f", at most {format_size(self.max_memory)} of weights" if self.max_memory else ""
        workers = "" if self.workers == "local" else f", workers {self.workers}"
        return f"{self.device} ({dtype_name(self.dtype) if self.dtype else 'checkpoint dtype'}{budget}{workers})"

    def streams(self, weight_bytes: int) -> bool:
        """Whether a model of ``weight_bytes`` (in its compute dtype) exceeds the memory budget."""
        return self.max_memory is not None and weight_bytes > self.max_memory

    @property
    def accum_dtype(self) -> torch.dtype:
        """Running sums and regressions: float64, except on MPS, which has none."""
        return accum_dtype(self.device)

    def compute_dtype(self, stored: torch.dtype) -> torch.dtype:
        """The dtype a checkpoint stored in ``stored`` is loaded in; refuses what the device cannot run."""
        dtype = self.dtype or stored
        if dtype == torch.bfloat16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise PruneflowError(f"dtype bfloat16 is not supported by {torch.cuda.get_device_name(self.device)}; "
                                 f"use --dtype float16 or float32")
        if dtype == torch.bfloat16 and self.device.type == "mps" and not _mps_bf16():
            raise PruneflowError("dtype bfloat16 needs macOS 14 or newer on MPS; use --dtype float16 or float32")
        return dtype

    def placement(self, weight_bytes: int) -> dict:
        """``from_pretrained`` keyword arguments that put a model of ``weight_bytes`` on this runtime."""
        if self.device.type == "cpu":
            return {}
        if self.device.type != "cuda":
            return {"device_map": {"": str(self.device)}}
        free = {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
        return plan_gpu_placement(weight_bytes, self.device.index or 0, free)

    def input_device(self, model: torch.nn.Module) -> torch.device:
        """Where a model's input ids go: the device of its input embedding (the first one under a device map)."""
        return model.get_input_embeddings().weight.device

    def batches(self, model: torch.nn.Module, windows: torch.Tensor, batch_size: int, desc: str | None = None):
        """``windows`` (N, T) in batches of ``batch_size`` rows on the model's input device (a progress bar with
        ``desc``)."""
        from tqdm import tqdm

        device = self.input_device(model)
        starts = range(0, len(windows), batch_size)
        for start in tqdm(starts, desc=desc, unit="batch", leave=False) if desc else starts:
            yield windows[start:start + batch_size].to(device)

    def synchronize(self) -> None:
        """Wait for queued kernels, so that a timer reads the work done, not the work launched."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def free(self) -> None:
        """Return freed memory between phases (a model dropped, an iteration done): CUDA's cached blocks, and on
        the CPU what glibc's heap keeps after large frees (``malloc_trim``), which otherwise adds up over the
        passes of an iterative method and shows as resident memory."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()
        _trim_heap()

    def release_host(self) -> None:
        """Between the passes of a long loop on the CPU: give glibc's freed heap pages back (cheap, no GC); a
        no-op on accelerators, whose caching allocators reuse their blocks."""
        if self.device.type == "cpu":
            _trim_heap()

    def reset_peak(self) -> None:
        """Start a new peak-memory window (see :meth:`peak_bytes`)."""
        if self.device.type == "cuda":
            for index in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(index)
        else:
            _reset_rss_peak()

    def peak_bytes(self) -> dict:
        """Peak memory since the process started or :meth:`reset_peak`: on CUDA the most bytes torch allocated
        (summed over GPUs under a device map), elsewhere the process's peak resident set."""
        if self.device.type == "cuda":
            self.synchronize()
            allocated = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
            return {"peak_bytes": int(allocated), "measure": "torch.cuda.max_memory_allocated"}
        return {"peak_bytes": peak_rss(), "measure": "peak RSS"}


def _trim_heap() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def accum_dtype(device: torch.device) -> torch.dtype:
    """The dtype statistics accumulate in on ``device``: float64, except on MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def _mps_bf16() -> bool:
    try:
        torch.ones(1, dtype=torch.bfloat16, device="mps")
        return True
    except (RuntimeError, TypeError):
        return False


def plan_gpu_placement(weight_bytes: int, index: int, free: dict[int, int]) -> dict:
    """One GPU when it holds the weights with room to spare; else accelerate's ``device_map="auto"`` over every
    visible GPU (never CPU or disk offload: offloaded weights cannot be sliced); else a clear error."""
    if weight_bytes <= WEIGHTS_SHARE * free[index]:
        return {"device_map": {"": index}}
    total = sum(free.values())
    if len(free) > 1 and weight_bytes <= WEIGHTS_SHARE * total:
        log.info("%.1f GiB of weights exceed one GPU: spreading them over %d GPUs (device_map=auto)",
                 weight_bytes / 2**30, len(free))
        return {"device_map": "auto", "max_memory": {i: int(WEIGHTS_SHARE * f) for i, f in free.items()}}
    raise PruneflowError(f"the model's weights ({weight_bytes / 2**30:.1f} GiB) do not fit the free memory of the "
                         f"visible GPU(s) ({total / 2**30:.1f} GiB, {WEIGHTS_SHARE:.0%} usable for weights); "
                         f"use --device cpu, a smaller --dtype, or more GPUs")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _reset_rss_peak() -> None:
    """Linux: writing 5 to /proc/self/clear_refs resets the peak resident set (VmHWM) to the current one."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        log.debug("cannot reset the RSS peak here; peak_bytes reports the process's lifetime peak")


def peak_rss() -> int:
    """Peak resident set of this process in bytes (VmHWM where /proc has it, else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
