"""The pipeline: the stages as library functions, their parameters and the LoRA recovery step.

Owns the one parameter tree (``params``: ``params.yaml`` as one pydantic model, the flow's parameter type), the
stage graph's names and outputs (``graph``: no heavy imports, the flow reads it), the stages over one artifacts
directory (``stages``: source → calibrate → score → prune → recover → evaluate → export) and LoRA recovery
with peft (``recover``). The top of the library: it may import every other room; nothing in the library imports
it except ``pruneflow.prune`` (for the parameter types) and the CLI. No Prefect, MLflow or DVC here: ``tasks/``
and ``flows/`` wrap these functions. This file imports nothing.
"""
