"""Candidates fanned out over replicas of the model on Ray workers (``--workers``, ``runtime.workers``).

``local`` (the default) runs everything in this process. ``N`` starts a local Ray instance (or joins the
cluster ``RAY_ADDRESS`` names) with N workers; ``auto`` joins ``RAY_ADDRESS`` or starts a local instance and
uses one worker per GPU (CUDA runtime) or per CPU; ``ray://HOST:PORT`` connects to a cluster's Ray Client
server. Ray's token authentication stays as Ray sets it (on by default).

Each worker is a Ray actor holding one replica of the model on one GPU (``num_gpus=1``) or one CPU: loaded from
the same source as the driver's model (its directory, or the hub id at the pinned commit through the node's
own cache), in memory or streamed under the same budget, then sliced by the same plans the driver applied
(the model's *lineage*: where it was loaded from and every ``apply`` since). The driver keeps the algorithm and
ships only candidates and batch numbers; a worker returns per-row loss sums, gathered in batch order, so the
losses equal ``--workers local`` on the same kind of hardware. A worker that dies is restarted by Ray and its
batches re-run (the call carries the lineage, so a fresh replica rebuilds the model first). A model whose
weights changed in a way the lineage cannot replay (a least-squares re-fit, recovery) is evaluated locally.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from pathlib import Path

import torch
from torch import nn

from pruneflow.model.arch import ArchSpec
from pruneflow.errors import PruneflowError
from pruneflow.execution.candidates import batch_sums as local_batch_sums
from pruneflow.execution.objectives import Objective
from pruneflow.execution.lineage import Lineage
from pruneflow.execution.runtime import Runtime
from pruneflow.model import checkpoint, sources
from pruneflow.units.apply import apply
from pruneflow.execution.streaming import calibration_pass

log = logging.getLogger(__name__)

RESTARTS = 3  # a worker process that dies is restarted this often, its calls retried as often


# ---- the pool --------------------------------------------------------------------------------------------------

class Replica:
    """One Ray actor: the model rebuilt from a lineage, evaluating batches of candidates."""

    def __init__(self, device: str, dtype: str | None, max_memory: int | None):
        self.runtime = Runtime(device=torch.device(device), dtype=getattr(torch, dtype) if dtype else None,
                               max_memory=max_memory)
        self.model, self.spec, self.key = None, None, None

    def _rebuild(self, lineage: Lineage) -> None:
        source = lineage.path if Path(lineage.path).is_dir() or lineage.pinned is None else lineage.pinned
        if not Path(lineage.path).is_dir() and lineage.pinned is None:
            raise PruneflowError(f"worker on {os.uname().nodename}: the model directory {lineage.path} is not "
                                 f"there; give workers a path every node sees, or a hub id")
        self.model, _, self.spec = checkpoint.load(sources.resolve(source), self.runtime, with_tokenizer=False,
                                                   stream=lineage.stream, calibration=lineage.calibration)
        for plan, scores in lineage.applied:
            apply(self.model, plan, self.spec, scores)
        self.key = lineage.key()

    def _ready(self, key: str, lineage_ref: list) -> None:
        """This replica is the model of lineage ``key`` (rebuilt when it is another's, or after a restart)."""
        import ray

        if key != self.key:
            self.model = None
            self.runtime.free()
            self._rebuild(ray.get(lineage_ref[0]))

    def batch_sums(self, key: str, lineage_ref: list, windows, candidates, batches, objective
                   ) -> list[torch.Tensor]:
        self._ready(key, lineage_ref)
        return local_batch_sums(self.model, self.spec, windows, candidates, batches, self.runtime,
                                progress=lambda _: None, objective=objective)

    def statistics(self, key: str, lineage_ref: list, windows, payload: tuple, batch_size: int):
        """``payload`` = (hooks, state): the caller's hooks run over ``windows`` on this replica, filling this
        copy of its ``state``, which goes back to be added to the others' (a tensor the hooks kept on this
        worker's accelerator travels on the CPU, marked to go back onto the driver's)."""
        self._ready(key, lineage_ref)
        hooks, state = payload
        calibration_pass(self.model, self.spec, windows, self.runtime, hooks, batch_size=batch_size)
        return _map(state, lambda t: _OnDevice(t.cpu()) if isinstance(t, torch.Tensor) and t.device.type != "cpu"
                    else t)

    def pid(self) -> int:
        return os.getpid()


class Pool:
    """The Ray actors of one ``--workers`` setting (started on first use, reused for the whole process)."""

    def __init__(self, workers: str, runtime: Runtime):
        try:
            import ray
        except ImportError:
            raise PruneflowError(f"--workers {workers} needs Ray: pip install 'pruneflow[ray]' (or ray>=2.60)"
                                 ) from None
        self.ray, self.runtime = ray, runtime
        gpu = runtime.device.type == "cuda"
        if workers.startswith("ray://"):
            _reachable(workers)
        if not ray.is_initialized():
            count = int(workers) if workers.isdigit() else None
            connect(workers if workers.startswith("ray://") else os.environ.get("RAY_ADDRESS"),
                    cpus=max(count or 0, os.cpu_count() or 1), what=f"--workers {workers}")
        resources = ray.cluster_resources()
        available = int(resources.get("GPU" if gpu else "CPU", 0))
        count = int(workers) if workers.isdigit() else available
        if count < 1 or count > available:
            kind = "GPU" if gpu else "CPU"
            raise PruneflowError(f"--workers {workers}: the Ray cluster has {available} {kind}(s) for "
                                 f"{count} worker(s) of one {kind} each")
        actor = ray.remote(num_gpus=1 if gpu else 0, num_cpus=0 if gpu else 1, max_restarts=RESTARTS,
                           max_task_retries=RESTARTS)(Replica)
        device = "cuda" if gpu else str(runtime.device)
        dtype = str(runtime.dtype).removeprefix("torch.") if runtime.dtype else None
        self.actors = [actor.remote(device, dtype, runtime.max_memory) for _ in range(count)]
        self.lineage_key, self.lineage_ref = None, None
        self.objective, self.objective_ref = None, None
        log.info("%d Ray worker(s) on %s, one model replica each", count, "GPUs" if gpu else "CPUs")

    def batch_sums(self, lineage: Lineage, windows, candidates, batches, desc: str, objective
                   ) -> list[torch.Tensor]:
        from tqdm import tqdm

        key = self._put(lineage)
        total = len(batches.owners)
        cuts = [round(total * k / len(self.actors)) for k in range(len(self.actors) + 1)]
        runs = [(actor, a, b) for actor, a, b in zip(self.actors, cuts, cuts[1:]) if b > a]
        if objective is not self.objective:  # a reference of (windows × T × D) goes to the store once, not per call
            self.objective, self.objective_ref = objective, self.ray.put(objective)
        futures = [actor.batch_sums.remote(key, [self.lineage_ref], windows, candidates, batches.part(a, b),
                                           self.objective_ref) for actor, a, b in runs]
        sizes = {future.hex(): b - a for future, (_, a, b) in zip(futures, runs)}
        with tqdm(total=total, desc=f"{desc} ({len(futures)} workers)", unit="batch", leave=False) as bar:
            pending = list(futures)
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                bar.update(sum(sizes[f.hex()] for f in done))
        parts = self._gather(futures, "evaluate candidates")
        return [sums for part in parts for sums in part]

    def statistics(self, lineage: Lineage, windows: torch.Tensor, hooks, state: tuple, batch_size: int,
                   desc: str) -> list:
        """Each worker's share of ``windows`` (whole batches of ``batch_size``, in order) through its replica
        with ``hooks``; their filled copies of ``state``, in window order."""
        key = self._put(lineage)
        batches = -(-len(windows) // batch_size)
        cuts = [round(batches * k / len(self.actors)) * batch_size for k in range(len(self.actors) + 1)]
        futures = [actor.statistics.remote(key, [self.lineage_ref], windows[a:b], (hooks, state), batch_size)
                   for actor, a, b in zip(self.actors, cuts, cuts[1:]) if b > a]
        log.info("%s: %d windows over %d workers", desc, len(windows), len(futures))
        return self._gather(futures, "compute statistics")

    def _put(self, lineage: Lineage) -> str:
        """``lineage`` in Ray's object store once (for every call until the model changes); its key."""
        key = lineage.key()
        if key != self.lineage_key:
            self.lineage_key, self.lineage_ref = key, self.ray.put(lineage)
        return key

    def _gather(self, futures: list, what: str) -> list:
        try:
            return self.ray.get(futures)
        except self.ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)  # the worker's own exception (its str has no Ray traceback)
            if isinstance(cause, PruneflowError):
                raise PruneflowError(f"a worker could not {what}: {cause.args[0] if cause.args else cause}") from None
            raise


def connect(address: str | None, cpus: int | None = None, what: str = "Ray", attempts: int = 3,
            wait: float = 2.0) -> None:
    """``ray.init``: join ``address`` (a cluster's GCS or ``ray://HOST:PORT``), or with none start a local
    instance of ``cpus`` CPUs. A Ray Client head starts one server process per connecting client, and that
    start fails now and then on a loaded head ("Starting Ray client server failed", seen in CI) while the next
    connection gets a fresh process: such a refusal is tried again, up to ``attempts`` times in all. Anything
    else (nothing listening, a wrong token: Ray Client waits 30 s itself) fails at once, as a PruneflowError."""
    import time

    import ray

    for attempt in range(1, attempts + 1):
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            return
        except ConnectionAbortedError as err:  # the head's server for this client did not start
            if "Starting Ray client server failed" not in str(err) or attempt == attempts:
                raise PruneflowError(f"{what}: cannot reach Ray at {address}: the head could not start a server "
                                     f"for this client ({attempts} tries); see ray_client_server_*.err in "
                                     f"the head's session logs") from None
            log.warning("%s: the Ray head at %s could not start a server for this client (try %d of %d); "
                        "trying again", what, address, attempt, attempts)
            time.sleep(wait * attempt)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise PruneflowError(f"{what}: cannot reach Ray at {address or 'a local instance'}: "
                                 f"{str(err).splitlines()[0][:300]}") from None


def _reachable(address: str, seconds: float = 5.0) -> None:
    """Something listens at ``ray://HOST:PORT`` (Ray Client itself waits 30 s before it gives up)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except OSError as err:
        raise PruneflowError(f"--workers {address}: nothing answers at {host}:{port} ({err.strerror or err}); "
                             f"start the cluster's head (`ray start --head`, or KubeRay) or check the address"
                             ) from None


_POOLS: dict[tuple, Pool] = {}


def pool_for(runtime: Runtime) -> Pool | None:
    if runtime.workers == "local":
        return None
    key = (runtime.workers, str(runtime.device), runtime.dtype, runtime.max_memory)
    if key not in _POOLS:
        _POOLS[key] = Pool(runtime.workers, runtime)
    return _POOLS[key]


def shutdown() -> None:
    """Drop every pool's actors (tests; the end of a process does the same)."""
    for pool in _POOLS.values():
        for actor in pool.actors:
            pool.ray.kill(actor)
    _POOLS.clear()


def batch_sums(model: nn.Module, spec: ArchSpec, windows, candidates, batches, runtime: Runtime,
               desc: str, objective: Objective | None = None) -> list[torch.Tensor]:
    """:func:`pruneflow.execution.candidates.batch_sums` on the workers, or here (``--workers local``, or a
    model the workers cannot rebuild)."""
    where = fanned_out(model, runtime)
    if where is not None:
        pool, lineage = where
        return pool.batch_sums(lineage, windows, candidates, batches, desc, objective)
    return local_batch_sums(model, spec, windows, candidates, batches, runtime, desc, objective=objective)


def fanned_out(model: nn.Module, runtime: Runtime) -> tuple[Pool, Lineage] | None:
    """The pool and the lineage its workers rebuild ``model`` from, or None where the work stays here
    (``--workers local``, a model not loaded from a checkpoint or changed in a way the lineage cannot replay, a
    model spread over several devices)."""
    pool = pool_for(runtime)
    if pool is None:
        return None
    lineage = getattr(model, "pruneflow_lineage", None)
    devices = set(getattr(model, "hf_device_map", {}).values())
    if lineage is not None and lineage.replayable and len(devices) <= 1:
        return pool, lineage
    log.info("running in this process: %s", "the model was not loaded from a checkpoint" if lineage is None
             else "its layers are spread over several devices" if len(devices) > 1
             else f"the workers cannot rebuild it ({lineage.why})")
    return None


def statistics(model: nn.Module, windows: torch.Tensor, runtime: Runtime, hooks, state: tuple, batch_size: int,
               desc: str) -> bool:
    """Fill ``state`` (a tuple of lists, dicts or tensors the ``hooks`` add to) from the workers: each runs a
    contiguous share of the windows, their states are added in window order (:func:`add`) and written into
    ``state`` in place. False (nothing done) where the pass must run here."""
    where = fanned_out(model, runtime)
    if where is None:
        return False
    pool, lineage = where
    parts = pool.statistics(lineage, windows, hooks, state, batch_size, desc)
    total = _map(functools.reduce(add, parts), lambda t: t.tensor.to(runtime.device) if isinstance(t, _OnDevice) else t)
    for mine, merged in zip(state, total):
        if isinstance(mine, list):
            mine[:] = merged
        elif isinstance(mine, dict):
            mine.clear()
            mine.update(merged)
        elif isinstance(mine, torch.Tensor):
            mine.copy_(merged)
        else:
            raise TypeError(f"statistics state must hold lists, dicts or tensors, not {type(mine).__name__}")
    return True


def add(a, b):
    """Two partial statistics of the same shape added: tensors and numbers summed, lists, tuples and dicts item
    by item (an empty list takes the other's items), objects attribute by attribute; anything else (a dtype,
    a name) must be equal."""
    if a is None or (isinstance(a, list) and not a):
        return b
    if b is None or (isinstance(b, list) and not b):
        return a
    if isinstance(a, torch.Tensor):
        return a + b.to(a.device)
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return a + b
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            raise ValueError(f"partial statistics of different lengths ({len(a)} and {len(b)})")
        return type(a)(add(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return {k: add(a.get(k), b.get(k)) for k in {**a, **b}}
    if hasattr(a, "__dict__") and type(a) is type(b) and not isinstance(a, type):
        merged = copy.copy(a)
        for name, value in vars(a).items():
            setattr(merged, name, add(value, getattr(b, name)))
        return merged
    if a != b:
        raise ValueError(f"partial statistics disagree: {a!r} and {b!r}")
    return a


class _OnDevice:
    """A tensor a worker's hooks kept on its accelerator, carried home on the CPU: the driver puts it on its own
    device, where its hooks would have kept it (one kept on the CPU, e.g. a per-combination loss, stays there)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _map(state, leaf):
    """``state`` with ``leaf`` applied to every tensor (and :class:`_OnDevice`) in it: lists, tuples, dicts and
    objects' attributes rebuilt, anything else as it is."""
    if isinstance(state, (torch.Tensor, _OnDevice)):
        return leaf(state)
    if isinstance(state, (list, tuple)):
        return type(state)(_map(x, leaf) for x in state)
    if isinstance(state, dict):
        return {k: _map(v, leaf) for k, v in state.items()}
    if hasattr(state, "__dict__") and not isinstance(state, type):
        mapped = copy.copy(state)
        for name, value in vars(state).items():
            setattr(mapped, name, _map(value, leaf))
        return mapped
    return state
