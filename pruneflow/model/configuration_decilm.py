"""Config class of a ``nemotron-nas`` (DeciLM) checkpoint written by ``pruneflow export vllm``.

Copied next to such checkpoints so ``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` — what vLLM calls
before building its ``DeciLMForCausalLM`` — works without the hub: transformers has no nemotron-nas config of its
own. It depends on transformers only. vLLM reads each block's settings by attribute
(``config.block_configs[i].attention.no_op``, ``.attention.n_heads_in_group``, ``.ffn.no_op``,
``.ffn.intermediate_size``), so the blocks are dicts that also answer attribute access: they still serialise
to the same JSON.
"""

from transformers import PretrainedConfig


class _Fields(dict):
    """A dict whose keys are also attributes (nested dicts too); a missing key is a missing attribute, so
    ``hasattr(block.ffn, "ffn_mult")`` is false as vLLM expects."""

    def __init__(self, values=None, **more):
        super().__init__()
        for key, value in {**(values or {}), **more}.items():
            self[key] = _Fields(value) if isinstance(value, dict) else value

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [_Fields(block) for block in (block_configs or [])]
        super().__init__(**kwargs)
