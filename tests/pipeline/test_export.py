"""GGUF export: every checkpoint kind pruneflow writes, loaded by llama.cpp itself (llama-cpp-python), with
logits within 1e-4 of transformers at an f32 KV cache and the same greedy generation; the file's structure;
and what llama.cpp cannot represent fails before anything is written.

llama-cpp-python is built from source by `make test`'s install; without it the engine tests skip, unless
``PRUNEFLOW_REQUIRE_LLAMA_CPP=1`` (set by ``.ci/run``) turns the skip into a failure.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_bert, tiny_causal_lm
from pruneflow.model import arch as A
from pruneflow.model import checkpoint
from pruneflow.units.apply import apply, remove_layers
from pruneflow.model.export import export_gguf, llama3_rope_factors, rope_permute
from pruneflow.selection.plan import LayerPlan, PrunePlan
from pruneflow.selection.scores import Scores
from tests.pipeline.test_cli import run

ALL = list(range(256))  # the tiny models' 256 MLP channels; 4 query heads in 2 KV groups of head_dim 16


def layer(heads, kv, channels):
    return LayerPlan(kept_heads=heads, kept_kv_heads=kv, kept_channels=channels)


# name: (family, per-block plan or None (dense), bias, tied, blocks removed afterwards)
KINDS = {
    "llama": ("llama", None, False, False, None),
    "llama-tied": ("llama", None, False, True, None),
    "mistral": ("mistral", None, False, False, None),
    "qwen2": ("qwen2", None, False, True, None),
    "qwen3": ("qwen3", None, False, False, None),
    "uniform-pruned": ("llama", [layer([0, 2], [0, 1], ALL[:100])] * 3, False, False, None),
    "per-layer": ("llama", [layer([0, 1, 2, 3], [0, 1], ALL[::2]), layer([1], [0], ALL[:64]),
                            layer([0, 2], [0, 1], ALL[:17])], False, False, None),
    "per-layer-bias": ("llama", [layer([0, 3], [0, 1], ALL[5:200]), layer([2, 3], [1], ALL[:64]),
                                 layer([0, 1, 2, 3], [0, 1], ALL[::3])], True, True, None),
    "qwen2-per-layer": ("qwen2", [layer([0, 1], [0], ALL[:150]), layer([0, 1, 2, 3], [0, 1], ALL[::4]),
                                  layer([3], [1], ALL[:40])], False, True, None),
    "removed-blocks": ("llama", None, False, False, [0, 3]),
    "removed-and-per-layer": ("llama", [layer([0, 1], [0], ALL[:90]), layer([0, 1, 2, 3], [0, 1], ALL),
                                        layer([2], [1], ALL[:30]), layer([1, 3], [0, 1], ALL[::5])],
                              False, False, [0, 2, 3]),
    # removed sub-blocks (deci n_head = 0 / a zero FFN channel): block 0's attention (the KV cache's first entry),
    # block 1's MLP, all of block 2
    "subblocks": ("llama", [layer([], [], ALL), layer([0, 1, 2, 3], [0, 1], []), layer([], [], []),
                            layer([0, 1, 2, 3], [0, 1], ALL[:100])], False, False, None),
    "qwen2-subblocks": ("qwen2", [layer([0, 1, 2, 3], [0, 1], []), layer([], [], ALL),
                                  layer([0, 1, 2, 3], [0, 1], ALL)], False, True, None),
}


def build(path, kind, tokenizer, dtype=None):
    family, layers, bias, tied, kept = KINDS[kind]
    count = len(layers) if layers else (4 if kept else 3)
    model = tiny_causal_lm(family, vocab_size=len(tokenizer), num_hidden_layers=count, tie_word_embeddings=tied)
    spec = A.arch_for(model.config.model_type)
    if layers:
        plan = PrunePlan(method="test", ratio=0.5, allocation="global", head_mode="query",
                         units=["subblocks"] if "subblocks" in kind else ["channels", "heads"], round_to=1, reconstruct="bias" if bias else "none", seed=0,
                         layers=[LayerPlan(**vars(p)) for p in layers])
        generator = torch.Generator().manual_seed(3)
        scores = Scores(heads=[torch.zeros(4)] * count, channels=[torch.zeros(256)] * count,
                        attn_mean=[torch.randn(64, generator=generator) for _ in range(count)],
                        mlp_mean=[torch.randn(256, generator=generator) for _ in range(count)]) if bias else None
        apply(model, plan, spec, scores)
    if kept:
        remove_layers(model, spec, kept)
    checkpoint.save(model, tokenizer, path, spec, dtype=dtype)
    return path


def llama_cpp():
    try:
        import llama_cpp as module
    except ImportError:
        if os.environ.get("PRUNEFLOW_REQUIRE_LLAMA_CPP"):
            raise
        pytest.skip("llama-cpp-python is not installed (make test builds it)")
    return module


def engine(path):
    return llama_cpp().Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, type_k=0, type_v=0,
                             flash_attn=False, n_threads=1, verbose=False)


def prompt(vocab: int, n: int = 20) -> list[int]:
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(7)).tolist()


def llama_cpp_error(model, gguf_path, vocab: int) -> float:
    """Largest |logit| difference between ``model`` (transformers) and the GGUF file in llama.cpp on a prompt."""
    ids = prompt(vocab)
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    llm = engine(gguf_path)
    llm.eval(ids)
    logits = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
    llm.close()
    return float(np.abs(logits - reference).max())


@pytest.mark.parametrize("kind", list(KINDS))
def test_llama_cpp_loads_each_kind_with_the_logits_and_greedy_tokens_of_transformers(kind, tmp_path,
                                                                                    tiny_tokenizer):
    source = build(tmp_path / kind, kind, tiny_tokenizer)
    summary = export_gguf(source, tmp_path / f"{kind}.gguf", "f32")
    family, layers, *_ = KINDS[kind]
    per_layer = layers is not None and len({(len(p.kept_heads), len(p.kept_channels)) for p in layers}) > 1
    expected = "deci" if per_layer or kind == "qwen2-per-layer" else {"mistral": "llama"}.get(family, family)
    assert summary["architecture"] == expected
    model, _, _ = checkpoint.load(source)
    ids = prompt(len(tiny_tokenizer))
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    llm = engine(tmp_path / f"{kind}.gguf")
    llm.eval(ids)
    logits = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
    assert np.abs(logits - reference).max() < 1e-4, np.abs(logits - reference).max()
    tokens = []
    for _ in range(8):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    llm.close()
    assert tokens == greedy


def test_a_bf16_checkpoint_exports_its_bf16_bits_and_llama_cpp_is_as_close_as_transformers_bf16(tmp_path,
                                                                                              tiny_tokenizer,
                                                                                              monkeypatch):
    """llama.cpp multiplies bf16 weights with bf16-rounded activations, so 1e-4 of the f32 forward is out of
    reach; the bar is transformers' own bf16 forward of the same weights, against the f32 forward of them. The
    progress bar counts the tensor bytes the file holds."""
    import gguf

    from conftest import record_bars, safetensors_of
    from pruneflow.execution.runtime import Runtime
    from pruneflow.model import export

    source = build(tmp_path / "bf16", "per-layer", tiny_tokenizer, dtype=torch.bfloat16)
    bars = record_bars(monkeypatch, export)
    summary = export_gguf(source, tmp_path / "bf16.gguf")  # auto: the checkpoint's dtype
    assert summary["dtype"] == "bfloat16" and summary["architecture"] == "deci"
    tensors = gguf.GGUFReader(tmp_path / "bf16.gguf").tensors
    assert [(bar.total, bar.n) for bar in bars] == [(sum(int(t.n_bytes) for t in tensors),) * 2]
    stored = {t.name: t for t in tensors}["blk.2.ffn_down.weight"]
    expected = safetensors_of(source)["model.layers.2.mlp.down_proj.weight"].view(torch.int16).numpy()
    assert np.array_equal(np.asarray(stored.data).view(np.int16).reshape(expected.shape), expected)
    ids = torch.tensor([prompt(len(tiny_tokenizer))])
    with torch.no_grad():
        f32 = checkpoint.load(source, Runtime.create("cpu", "float32"))[0](input_ids=ids).logits[0].numpy()
        bf16 = checkpoint.load(source, Runtime.create("cpu", "bfloat16"))[0](input_ids=ids).logits[0].float().numpy()
    llm = engine(tmp_path / "bf16.gguf")
    llm.eval(ids[0].tolist())
    logits = np.asarray(llm.scores[:ids.shape[1]])
    llm.close()
    assert np.abs(logits - f32).max() <= np.abs(bf16 - f32).max()
    assert (logits.argmax(-1) == f32.argmax(-1)).all()


def test_llama_cpp_splits_text_into_the_tokens_transformers_does(tmp_path, tiny_checkpoint, tiny_tokenizer):
    from pruneflow.data import corpus

    export_gguf(tiny_checkpoint, tmp_path / "tiny.gguf")
    llm = engine(tmp_path / "tiny.gguf")
    docs = corpus.load_split("test")[:10]
    ours = [llm.tokenize(doc.encode(), add_bos=False, special=False) for doc in docs]
    text = llm.detokenize(ours[0]).decode()
    llm.close()
    assert ours == [tiny_tokenizer(doc)["input_ids"] for doc in docs]
    assert text == docs[0]


def test_the_file_holds_per_layer_widths_and_the_tokenizer(tmp_path, tiny_tokenizer):
    import gguf

    source = build(tmp_path / "m", "per-layer", tiny_tokenizer)
    export_gguf(source, tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "deci"
    assert field("deci.attention.head_count") == [4, 1, 2] and field("deci.attention.head_count_kv") == [2, 1, 2]
    assert field("deci.feed_forward_length") == [128, 64, 17]
    assert field("deci.attention.key_length") == 16 and field("deci.rope.dimension_count") == 16
    assert field("tokenizer.ggml.model") == "gpt2" and len(field("tokenizer.ggml.tokens")) == len(tiny_tokenizer)
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.1.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.1.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # 1-D stay f32
    assert list(tensors["blk.2.ffn_down.weight"].shape) == [17, 64]  # GGUF lists dims innermost first


def test_rope_permute_interleaves_the_two_halves_of_each_head():
    rows = torch.arange(8.0)  # 2 heads of head_dim 4: HF pairs (0, 2), (1, 3) rotate together
    assert rope_permute(rows, heads=2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    weight = torch.randn(8, 3)
    assert torch.equal(rope_permute(weight, 2)[1], weight[2])


def test_llama3_rope_factors_are_the_divisors_of_transformers_llama3_frequencies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=16, head_dim=128, rope_parameters=rope,
                         max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    factors = llama3_rope_factors(rope, 128).double()
    assert factors.min() == 1.0 and factors.max() == 8.0
    torch.testing.assert_close(plain / factors, scaled.double(), rtol=1e-5, atol=0)


def test_an_export_with_an_existing_output_or_no_checkpoint_fails_with_exit_2_and_writes_nothing(tmp_path,
                                                                                                tiny_checkpoint):
    out = tmp_path / "model.gguf"
    out.write_text("mine")
    result = run("export", "gguf", tiny_checkpoint, out)
    assert result.exit_code == 2 and "already exists" in result.output and out.read_text() == "mine"
    result = run("export", "gguf", tmp_path / "nothing", tmp_path / "new.gguf")
    assert result.exit_code == 2 and "does not exist" in result.output
    for kind, name in (("gguf", "x.gguf"), ("onnx", "x"), ("vllm", "x")):  # under a file: a traceback (gguf)
        result = run("export", kind, tiny_checkpoint, out / name)
        assert result.exit_code == 2 and f"{out} is a file, not a writable directory" in result.output, kind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"] and out.read_text() == "mine"


def test_a_truncated_checkpoint_fails_with_exit_2_and_leaves_no_partial_file(tmp_path, tiny_checkpoint):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run("export", "gguf", broken, tmp_path / "out.gguf")
    assert result.exit_code == 2 and "truncated" in result.output
    assert not any(p.suffix in (".gguf", ".tmp") for p in tmp_path.iterdir())


@pytest.mark.parametrize("case, message", [
    ("qwen3-per-layer", "q/k norms"), ("qwen3-bias", "no o_proj/down_proj bias"), ("bert", "no GGUF export"),
])
def test_what_llama_cpp_cannot_represent_is_refused_before_writing(case, message, tmp_path, tiny_tokenizer):
    path = tmp_path / case
    if case == "bert":
        model = tiny_bert(vocab_size=len(tiny_tokenizer))
    else:
        model = tiny_causal_lm("qwen3", vocab_size=len(tiny_tokenizer))
    spec = A.arch_for(model.config.model_type)
    if case.startswith("qwen3"):
        layers = [layer([0, 1], [0], ALL[:100]), layer([0, 1, 2, 3], [0, 1], ALL[:50])]
        if case == "qwen3-bias":
            layers = [layer([0, 2], [0, 1], ALL[:100])] * 2
        plan = PrunePlan(method="test", ratio=0.5, allocation="global", head_mode="query",
                         units=["channels", "heads"], round_to=1,
                         reconstruct="bias" if case == "qwen3-bias" else "none", seed=0, layers=layers)
        scores = Scores(heads=[torch.zeros(4)] * 2, channels=[torch.zeros(256)] * 2,
                        attn_mean=[torch.ones(64)] * 2, mlp_mean=[torch.ones(256)] * 2)
        apply(model, plan, spec, scores)
    checkpoint.save(model, tiny_tokenizer, path, spec)
    result = run("export", "gguf", path, tmp_path / "out.gguf")
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out.gguf").exists() and not list(tmp_path.glob(".out.gguf.*"))


def test_export_cli_prints_what_it_wrote(tmp_path, tiny_checkpoint):
    result = run("export", "gguf", tiny_checkpoint, tmp_path / "tiny.gguf", "--dtype", "f16")
    assert result.exit_code == 0, result.output
    assert "llama, 2 blocks, float16" in result.output
    import gguf

    assert gguf.GGUFReader(tmp_path / "tiny.gguf").fields["general.architecture"].contents() == "llama"


@pytest.mark.parametrize("kind", ["per-layer-bias", "qwen2-per-layer", "removed-and-per-layer", "bert"])
def test_onnx_runtime_runs_each_kind_with_the_outputs_of_torch(kind, tmp_path, tiny_tokenizer):
    """Per-layer widths, FLAP biases, q/k/v biases, removed blocks and an encoder: ONNX Runtime's output on a
    new batch (another length, a padded row) within 1e-4 of torch's; the tokenizer loads from the directory."""
    import onnxruntime
    from transformers import AutoTokenizer

    from pruneflow.model.export import export_onnx

    if kind == "bert":
        source = tmp_path / "bert"
        model = tiny_bert(vocab_size=len(tiny_tokenizer))
        checkpoint.save(model, tiny_tokenizer, source, A.arch_for("bert"))
    else:
        source = build(tmp_path / kind, kind, tiny_tokenizer)
    summary = export_onnx(source, tmp_path / "onnx")
    assert summary["output"] == ("last_hidden_state" if kind == "bert" else "logits")
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(1, len(tiny_tokenizer), (3, 31), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[2, :9] = 0
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    model, _, spec = checkpoint.load(source)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    want = (out.logits if spec.causal_lm else out.last_hidden_state).numpy()
    valid = mask.numpy().astype(bool)
    assert np.abs(got - want)[valid].max() < 1e-4
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "onnx")
    assert tokenizer("the river")["input_ids"] == tiny_tokenizer("the river")["input_ids"]


def test_an_onnx_export_onto_an_existing_directory_fails_with_exit_2_and_keeps_it(tmp_path, tiny_checkpoint):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    result = run("export", "onnx", tiny_checkpoint, out)
    assert result.exit_code == 2 and "already exists" in result.output
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_evaluate_with_llama_cpp_measures_each_model_in_the_engine_and_the_report_shows_it(tmp_path,
                                                                                         tiny_tokenizer):
    from pruneflow.evaluation.evaluate import evaluate_dirs
    from pruneflow.pipeline.params import EvaluateParams
    from pruneflow.evaluation.report import run_table

    llama_cpp()
    dense = build(tmp_path / "dense", "llama", tiny_tokenizer)
    pruned = build(tmp_path / "pruned", "per-layer", tiny_tokenizer)
    ev = EvaluateParams(max_windows=2, speed=False, llama_cpp=True, ppl_seqlen=32, decode_tokens=4)
    rows = evaluate_dirs({"dense": dense, "pruned": pruned}, ev)
    for row in rows.values():
        assert row["llama_cpp_prefill_ms"] > 0 and row["llama_cpp_decode_tok_s"] > 0
    table = run_table({"run": {**rows, "achieved_ratio": 0.3, "gates_passed": True}})
    assert "llama.cpp decode tok/s" in table.splitlines()[0]
    assert "llama.cpp" not in run_table({"run": {"dense": {"test_ppl": 1.0}}})


def test_evaluate_llama_cpp_without_llama_cpp_python_is_refused_when_the_params_load(monkeypatch):
    import importlib.util

    from pydantic import ValidationError

    from pruneflow.pipeline.params import EvaluateParams

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(ValidationError, match="llama-cpp-python"):
        EvaluateParams(llama_cpp=True)
    assert EvaluateParams().llama_cpp is False


# --- quantized GGUF (llama.cpp's own quantizer) ---------------------------------------------------------------

REFERENCE = Path(__file__).resolve().parents[2] / "models" / "reference"  # hidden 256: k-quant rows
# |perplexity in llama.cpp / the f16 file's − 1| on the reference model's first test windows; measured there
# (2-core CPU, 16 windows of 256): q8_0 −0.01%, q6_k +0.01%, q5_k_m +0.07%, q4_k_m +0.46%
PPL_BOUND = {"q8_0": 0.005, "q6_k": 0.005, "q5_k_m": 0.01, "q4_k_m": 0.02}


@pytest.fixture(scope="module")
def reference_f16(tmp_path_factory):
    """The reference model as an f16 GGUF and its test stream."""
    from pruneflow.data import calibration as C

    out = tmp_path_factory.mktemp("quantize") / "reference-f16.gguf"
    export_gguf(REFERENCE, out, "f16")
    return out, C.held_out(checkpoint.load_tokenizer(REFERENCE), "corpus")


def test_llama_cpp_perplexity_of_a_gguf_is_transformers_perplexity(reference_f16):
    from pruneflow.evaluation.evaluate import llama_cpp_perplexity, perplexity

    llama_cpp()
    path, stream = reference_f16
    model, _, _ = checkpoint.load(REFERENCE)
    expected = perplexity(model.half().float(), stream, 128, max_windows=4)  # the f16 weights, in float32
    assert abs(llama_cpp_perplexity(path, stream, 128, max_windows=4) / expected - 1) < 1e-4


@pytest.mark.parametrize("kind", list(PPL_BOUND))
def test_each_quantized_gguf_loads_in_llama_cpp_with_a_perplexity_near_the_f16_files(kind, reference_f16, tmp_path):
    from pruneflow.evaluation.evaluate import llama_cpp_perplexity
    from pruneflow.model.quantize import quantize_gguf

    llama_cpp()
    path, stream = reference_f16
    summary = quantize_gguf(path, tmp_path / f"{kind}.gguf", kind, threads=1)
    main = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K", "q4_k_m": "Q4_K"}[kind]
    assert summary["tensors"].get(main, 0) >= 40 and summary["bytes"] < 0.7 * path.stat().st_size
    f16 = llama_cpp_perplexity(path, stream, 128, max_windows=4)
    quantized = llama_cpp_perplexity(tmp_path / f"{kind}.gguf", stream, 128, max_windows=4)
    assert abs(quantized / f16 - 1) <= PPL_BOUND[kind], (quantized, f16)
    assert quantized != f16  # the weights did change


def test_the_quantizer_names_each_tensor_whose_rows_cannot_take_the_type(reference_f16, tmp_path, monkeypatch):
    """The reference model's ffn_down rows are its 688 MLP channels (not a multiple of 256, nor of q8_0's 32):
    those 8 tensors fall back, named with the reason; kept at 512 channels (a multiple of 256), none does. The
    progress bar follows llama.cpp's own count of the tensors it quantizes."""
    from conftest import record_bars
    from pruneflow.model import quantize
    from pruneflow.model.quantize import quantize_gguf

    bars = record_bars(monkeypatch, quantize)
    llama_cpp()
    summary = quantize_gguf(reference_f16[0], tmp_path / "q4.gguf", "q4_k_m", threads=1)
    tensors = sum(summary["tensors"].values())
    assert [(bar.total, bar.n) for bar in bars] == [(tensors, tensors - 1)]  # the last tensor began
    assert summary["fallback_count"] == 8
    assert [f["tensor"] for f in summary["fallbacks"]] == [f"blk.{i}.ffn_down.weight" for i in range(8)]
    assert {(f["got"], f["why"]) for f in summary["fallbacks"]} == {
        ("F16", "rows of 688 values are not a multiple of 256")}
    model, tokenizer, spec = checkpoint.load(REFERENCE)
    plan = PrunePlan(method="test", ratio=0.2, allocation="uniform", head_mode="query", units=["channels"],
                     round_to=256, reconstruct="none", seed=0,
                     layers=[LayerPlan(kept_heads=list(range(8)), kept_kv_heads=list(range(4)),
                                       kept_channels=list(range(512)))] * 8)
    apply(model, plan, spec)
    checkpoint.save(model, tokenizer, tmp_path / "rounded", spec)
    result = run("export", "gguf", tmp_path / "rounded", tmp_path / "rounded.gguf", "--quantize", "q4_k_m")
    assert result.exit_code == 0, result.output
    assert "quantized to q4_k_m" in result.output and "fell back" not in result.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the unquantized temporary is gone


def test_bad_quantization_input_fails_with_exit_2_and_writes_nothing(reference_f16, tmp_path, tiny_checkpoint,
                                                                      monkeypatch):
    import sys

    from pruneflow.model.quantize import quantize_gguf

    llama_cpp()
    quantized = tmp_path / "q8.gguf"
    quantize_gguf(reference_f16[0], quantized, "q8_0", threads=1)
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (("export", "gguf", quantized, tmp_path / "again.gguf", "--quantize", "q4_k_m"), "already quantized (Q8_0)"),
        (("export", "gguf", tiny_checkpoint, tmp_path / "a.gguf", "--quantize", "q3_k"),
         "unknown quantization type 'q3_k'; choose from q8_0, q6_k, q5_k_m, q4_k_m"),
        (("export", "gguf", reference_f16[0], tmp_path / "b.gguf"), "give --quantize TYPE"),
        (("export", "gguf", reference_f16[0], quantized, "--quantize", "q8_0"), "already exists"),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # llama-cpp-python not installed
    result = run("export", "gguf", tiny_checkpoint, tmp_path / "c.gguf", "--quantize", "q8_0")
    assert result.exit_code == 2 and "needs llama.cpp's quantizer from llama-cpp-python" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
