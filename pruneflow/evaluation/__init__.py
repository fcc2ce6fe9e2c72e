"""Evaluation: how good, how big and how fast a model is.

Owns perplexity under one pinned protocol, sizes, speed and encoder fidelity (``evaluate``; passes through the
execution layer, GGUF through llama.cpp), zero-shot tasks with lm-eval (``lm_tasks``) and the comparison tables
of runs (``report``). May import the model and data rooms and the execution layer; never pruning or the
pipeline. This file imports nothing.
"""
