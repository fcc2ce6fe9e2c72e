"""The execution layer: the one place that knows how forward passes over a model's blocks run.

In memory (batch by batch through the whole model), streamed under the memory budget (a skeleton on the meta
device, one block loaded at a time: :mod:`.streaming`), or fanned out over replicas on Ray workers
(:mod:`.replicas`, rebuilt from the model's :mod:`.lineage`). Methods, the allocation search and evaluation ask
:mod:`.passes` and never which way it answers:

- ``calibration_pass`` — the calibration windows through every block with the caller's hooks (statistics);
- ``losses`` — the mean next-token loss of N :class:`.candidates.Candidates` (virtual sub-models as keep masks on
  heads, channels and blocks), and ``nll_batches`` for the model itself (perplexity).

Also here: the one ``Runtime`` that owns device, dtype, memory budget and workers (``runtime``), next-token losses
from final hidden states a chunk at a time (``losses``) and running activation moments (``stats``).

Layering: ``lineage`` imports nothing of pruneflow's; ``streaming`` and ``candidates`` only the model room and the
unit masks (arch, masking, losses, runtime); ``replicas`` rebuilds models with ``checkpoint`` and ``apply``;
``passes`` sits on top. Nothing here imports a method module, selection or the pipeline (``estimate`` reads the
method registry's metadata), and this file imports nothing: it holds the vocabulary of ``runtime.device`` and
``runtime.workers`` that the parameters (which load no torch) check and :mod:`.runtime` resolves.
"""

DEVICES = r"^(auto|cpu|mps|cuda(:\d+)?)$"
DEVICE_WORDS = "auto, cpu, cuda, cuda:N or mps"
WORKERS = r"^(local|auto|[1-9]\d*|ray://[\w.-]+:\d+)$"  # pruneflow.execution.replicas
WORKERS_WORDS = "local, a number of workers (1 or more), auto or ray://HOST:PORT"
