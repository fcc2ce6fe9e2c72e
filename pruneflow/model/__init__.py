"""Model I/O and architectures: what a model is and how it is read and written.

Owns the architecture data (``arch.ArchSpec``: where each prunable projection lives, per ``model_type``), the MLP
as a strategy (``mlp``: dense or fused experts — the only place besides ``arch`` and the MoE units that knows MoE),
the per-layer loader shipped with non-uniform checkpoints (``modeling_pruneflow``: torch and transformers only),
where a model comes from (``sources``: a directory or a hub id), checkpoints (``checkpoint``: safetensors + config
+ plan) and serving formats (``export``: GGUF, ONNX; ``quantize``: GGUF through llama.cpp's quantizer; ``deci``:
nemotron-nas for vLLM, with the config class ``configuration_decilm`` shipped beside it). May import
``pruneflow.errors``/``sizes``/``atomic``, the data room's packaged paths and the execution layer (a streamed load
or save); never a method, selection or the pipeline. This file imports nothing.
"""
