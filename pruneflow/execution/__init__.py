"""The execution layer: the one place that knows how forward passes over a model's blocks run.

In memory (batch by batch through the whole model), streamed under the memory budget (a skeleton on the meta
device, one block loaded at a time: :mod:`.streaming`), or fanned out over replicas on Ray workers
(:mod:`.replicas`). Methods, the allocation search, reconstruction and evaluation ask it two questions and
never which way it answers them:

- :func:`calibration_pass` — the calibration windows through every block with the caller's hooks (statistics);
- :func:`losses` — the mean next-token loss of N :class:`Candidates` (virtual sub-models as keep masks on heads,
  channels and blocks), and :func:`nll_batches` for the model itself (perplexity).

It may import the model I/O and architecture modules (arch, masking, losses, runtime); nothing here imports a
method, selection or the pipeline.
"""

from pruneflow.execution.candidates import Candidates, losses, nll_batches
from pruneflow.execution.streaming import calibration_pass, each_block

__all__ = ["Candidates", "calibration_pass", "each_block", "losses", "nll_batches"]
