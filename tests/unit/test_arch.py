import pytest

from conftest import tiny_causal_lm
from pruneflow.model import arch as A
from pruneflow.errors import PruneflowError


def test_unsupported_model_type_lists_the_supported_ones():
    with pytest.raises(PruneflowError, match="unsupported model type 'gpt2'; supported: bert, llama, mistral, mixtral, qwen2, qwen3, qwen3_moe"):
        A.arch_for("gpt2")


def test_pruned_model_types_map_to_their_base():
    assert A.arch_for("pruneflow_qwen3") is A.arch_for("qwen3")


@pytest.mark.parametrize("kind,tied", [("llama", False), ("qwen2", True)])
def test_non_embedding_count_excludes_embeddings_tied_or_not(kind, tied):
    model = tiny_causal_lm(kind)
    counts = A.count_parameters(model)
    embedding = model.get_input_embeddings().weight.numel() * (1 if tied else 2)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["non_embedding"] == counts["total"] - embedding


def test_geometry_reads_explicit_head_dim():
    model = tiny_causal_lm("qwen3")  # head_dim 16 explicitly
    geo = A.geometry(model.config)
    assert (geo.head_dim, geo.num_heads, geo.num_kv_heads, geo.group_size) == (16, 4, 2, 2)
