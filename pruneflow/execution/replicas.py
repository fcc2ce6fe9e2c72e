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

import logging
import os
from pathlib import Path

import torch
from torch import nn

from pruneflow.arch import ArchSpec
from pruneflow.errors import PruneflowError
from pruneflow.execution.candidates import batch_sums as local_batch_sums
from pruneflow.execution.lineage import Lineage
from pruneflow.runtime import Runtime

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
        from pruneflow import checkpoint, sources
        from pruneflow.apply import apply

        source = lineage.path if Path(lineage.path).is_dir() or lineage.pinned is None else lineage.pinned
        if not Path(lineage.path).is_dir() and lineage.pinned is None:
            raise PruneflowError(f"worker on {os.uname().nodename}: the model directory {lineage.path} is not "
                                 f"there; give workers a path every node sees, or a hub id")
        self.model, _, self.spec = checkpoint.load(sources.resolve(source), self.runtime, with_tokenizer=False,
                                                   stream=lineage.stream, calibration=lineage.calibration)
        for plan, scores in lineage.applied:
            apply(self.model, plan, self.spec, scores)
        self.key = lineage.key()

    def batch_sums(self, key: str, lineage_ref: list, windows, candidates, batches) -> list[torch.Tensor]:
        import ray

        if key != self.key:
            self.model = None
            self.runtime.free()
            self._rebuild(ray.get(lineage_ref[0]))
        return local_batch_sums(self.model, self.spec, windows, candidates, batches, self.runtime,
                                progress=lambda _: None)

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
            address = workers if workers.startswith("ray://") else os.environ.get("RAY_ADDRESS")
            try:
                if address:
                    ray.init(address=address, log_to_driver=False)
                else:
                    count = int(workers) if workers.isdigit() else None
                    ray.init(num_cpus=max(count or 0, os.cpu_count() or 1), include_dashboard=False,
                             log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise PruneflowError(f"--workers {workers}: cannot reach Ray at {address or 'a local instance'}: "
                                     f"{str(err).splitlines()[0][:300]}") from None
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
        log.info("%d Ray worker(s) on %s, one model replica each", count, "GPUs" if gpu else "CPUs")

    def batch_sums(self, lineage: Lineage, windows, candidates, batches, desc: str) -> list[torch.Tensor]:
        from tqdm import tqdm

        key = lineage.key()
        if key != self.lineage_key:
            self.lineage_key, self.lineage_ref = key, self.ray.put(lineage)
        total = len(batches.owners)
        cuts = [round(total * k / len(self.actors)) for k in range(len(self.actors) + 1)]
        runs = [(actor, a, b) for actor, a, b in zip(self.actors, cuts, cuts[1:]) if b > a]
        futures = [actor.batch_sums.remote(key, [self.lineage_ref], windows, candidates, batches.part(a, b))
                   for actor, a, b in runs]
        sizes = {future.hex(): b - a for future, (_, a, b) in zip(futures, runs)}
        with tqdm(total=total, desc=f"{desc} ({len(futures)} workers)", unit="batch", leave=False) as bar:
            pending = list(futures)
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                bar.update(sum(sizes[f.hex()] for f in done))
        try:
            parts = self.ray.get(futures)
        except self.ray.exceptions.RayTaskError as err:
            cause = err.as_instanceof_cause()
            if isinstance(cause, PruneflowError):
                raise PruneflowError(f"a worker could not evaluate candidates: {cause}") from None
            raise
        return [sums for part in parts for sums in part]


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
               desc: str) -> list[torch.Tensor]:
    """:func:`pruneflow.execution.candidates.batch_sums` on the workers, or here (``--workers local``, or a
    model the workers cannot rebuild)."""
    pool = pool_for(runtime)
    lineage = getattr(model, "pruneflow_lineage", None)
    if pool is not None and lineage is not None and lineage.replayable:
        return pool.batch_sums(lineage, windows, candidates, batches, desc)
    if pool is not None:
        log.info("evaluating candidates in this process: %s", "the model was not loaded from a checkpoint"
                 if lineage is None else f"the workers cannot rebuild it ({lineage.why})")
    return local_batch_sums(model, spec, windows, candidates, batches, runtime, desc)
