"""vLLM serves what pruneflow writes, with the outputs of transformers: vanilla checkpoints (uniform widths,
removed blocks, a pruned hidden size — all three in one model —, and experts pruned to one count per layer) as
they are, and per-layer widths and removed sub-blocks through ``pruneflow export vllm`` (nemotron-nas).

vLLM's CPU build lives in its own venv (``.venv-vllm``, built by ``make test``: it pins transformers<5.20);
nothing of it is imported here: one subprocess runs ``benchmarks/vllm_driver.py`` there for every model (each
start of vLLM's engine costs ~20 s on 2 cores). Without that venv these tests skip, unless
``PRUNEFLOW_REQUIRE_VLLM=1`` (set by ``.ci/run``) turns the skip into a failure.

The comparison is teacher-forced: transformers runs each prompt followed by vLLM's greedy tokens; every one of
them must be transformers' argmax there (up to a tie within 1e-4) with the same log-probability within 1e-3
(float32 in both), so a near-tie in a tiny random model cannot flip the verdict and a real difference cannot pass.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import record_bars, tiny_moe
from pruneflow.model import arch as A
from pruneflow.model import checkpoint, deci
from pruneflow.model.deci import export_vllm
from pruneflow.selection.plan import LayerPlan, PrunePlan
from pruneflow.units import experts, hidden
from pruneflow.units.apply import apply, remove_layers
from tests.pipeline.test_cli import run

# on the worker that runs the real stack, one test after another: in one CI run `pruneflow up --ray`'s Ray client
# server failed to start while this module's vLLM engines started beside it (cause not pinned down); never together
pytestmark = pytest.mark.xdist_group("stack")

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "models" / "reference"  # 8 blocks, hidden 256, 8 query heads over 4 KV heads, 688 channels
VLLM_PYTHON = Path(os.environ.get("PRUNEFLOW_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
PROMPTS = [[5, 17, 42, 99, 7, 250, 31, 64], [300, 12, 8, 1000, 45]]
STEPS = 8
TIE, LOGPROB_TOL = 1e-4, 1e-3


def layer(heads, kv, channels):
    return LayerPlan(kept_heads=heads, kept_kv_heads=kv, kept_channels=channels)


def _planned(model, spec, layers, units):
    plan = PrunePlan(method="test", ratio=0.3, allocation="global", head_mode="query", units=units, round_to=1,
                     reconstruct="none", seed=0, layers=layers)
    apply(model, plan, spec)


def build_vanilla(out: Path) -> Path:
    """The reference model with uniform widths (6 of 8 heads, 512 of 688 channels), blocks 3 and 5 removed and
    the hidden size cut to 192: still a stock Llama."""
    model, tokenizer, spec = checkpoint.load(REFERENCE)
    _planned(model, spec, [layer(list(range(6)), [0, 1, 2], list(range(512)))] * 8, ["heads", "channels"])
    remove_layers(model, spec, [0, 1, 2, 4, 6, 7])
    hidden.apply(model, spec, [i for i in range(256) if i % 4 != 3])
    checkpoint.save(model, tokenizer, out, spec)
    assert json.loads((out / "pruneflow.json").read_text())["vanilla"]
    return out


def build_moe(out: Path) -> Path:
    """A tiny Qwen3-MoE (head_dim 32: vLLM's CPU attention has no kernel for 16) with 6 of its 8 experts kept
    in each block (different ones): a stock checkpoint."""
    model = tiny_moe("qwen3_moe", vocab_size=1024, hidden_size=128, head_dim=32)
    spec = A.arch_for("qwen3_moe")
    experts.apply(model, spec, [[0, 1, 2, 3, 4, 5], [1, 2, 4, 5, 6, 7]])
    model.save_pretrained(out)
    return out


def build_per_layer(out: Path) -> Path:
    """The reference model with per-layer MLP widths and removed sub-blocks: block 0 without attention (written
    with a zero attention for vLLM), block 2 without MLP, block 5 without either."""
    model, tokenizer, spec = checkpoint.load(REFERENCE)
    heads, kv = list(range(8)), list(range(4))
    widths = [300, 688, 0, 120, 256, 0, 17, 500]
    layers = [layer([] if i in (0, 5) else heads, [] if i in (0, 5) else kv, list(range(w)))
              for i, w in enumerate(widths)]
    _planned(model, spec, layers, ["subblocks", "channels"])
    checkpoint.save(model, tokenizer, out, spec)
    return out


def vllm_python() -> Path:
    if not VLLM_PYTHON.exists():
        if os.environ.get("PRUNEFLOW_REQUIRE_VLLM"):
            pytest.fail(f"vLLM's venv is missing ({VLLM_PYTHON}): `make vllm` builds it")
        pytest.skip("vLLM's venv is not built (make vllm)")
    return VLLM_PYTHON


# session, not module: one vLLM run (~200 s in CI) per worker, whatever order the worker gets this module's tests in
@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """Each kind: (the checkpoint transformers loads, what vLLM loads, vLLM's result)."""
    python = vllm_python()
    tmp = tmp_path_factory.mktemp("vllm")
    per_layer = build_per_layer(tmp / "per-layer")
    kinds = {"vanilla": (build_vanilla(tmp / "vanilla"),) * 2, "moe": (build_moe(tmp / "moe"),) * 2,
             "nemotron-nas": (per_layer, tmp / "per-layer-vllm")}
    summary = export_vllm(per_layer, tmp / "per-layer-vllm")
    assert (summary["no_op_attention"], summary["no_op_ffn"], summary["zero_attention"]) == ([5], [2, 5], [0])
    job = tmp / "job.json"
    job.write_text(json.dumps({"models": [str(v) for _, v in kinds.values()], "prompts": PROMPTS,
                               "max_tokens": STEPS, "max_model_len": 64}))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    done = subprocess.run([str(python), str(ROOT / "benchmarks" / "vllm_driver.py"), str(job), str(tmp / "out.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp / "out.json").read_text())
    return {name: (src, results[str(dst)]) for name, (src, dst) in kinds.items()}


@pytest.mark.parametrize("kind", ["vanilla", "moe", "nemotron-nas"])
def test_vllm_generates_what_transformers_does(kind, served):
    source, result = served[kind]
    assert "error" not in result, result.get("error")
    model = checkpoint.load(source, with_tokenizer=False)[0].float()
    for prompt, tokens, logprobs in zip(PROMPTS, result["tokens"], result["logprobs"]):
        assert len(tokens) == STEPS
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].double()
        expected = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)  # the distributions vLLM sampled from
        chosen = expected[torch.arange(STEPS), tokens]
        assert (chosen >= expected.max(dim=-1).values - TIE).all(), (kind, tokens, expected.argmax(-1).tolist())
        assert (chosen - torch.tensor(logprobs, dtype=torch.float64)).abs().max() < LOGPROB_TOL


def test_a_checkpoint_vllm_cannot_hold_is_refused_before_writing(tmp_path):
    """Per-layer query heads and FLAP's output biases name the servable recipe; exit 2, nothing written."""
    model, tokenizer, spec = checkpoint.load(REFERENCE)
    _planned(model, spec, [layer(list(range(8 - 2 * (i % 2))), list(range(4 - i % 2)), list(range(688)))
                           for i in range(8)], ["heads", "channels"])
    checkpoint.save(model, tokenizer, tmp_path / "heads", spec)
    result = run("export", "vllm", tmp_path / "heads", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "one query-head count" in result.output and "--units channels --allocation global" in result.output
    assert not (tmp_path / "out").exists()
    moe = tmp_path / "moe"
    tiny_moe("qwen3_moe").save_pretrained(moe)
    result = run("export", "vllm", moe, tmp_path / "out")
    assert result.exit_code == 2 and "vLLM loads from its directory as it is" in result.output
    assert not (tmp_path / "out").exists()


def test_the_shipped_config_class_gives_vllm_attributes_and_saves_as_json(tmp_path):
    from transformers import AutoConfig

    model, tokenizer, spec = checkpoint.load(REFERENCE)
    _planned(model, spec, [layer(list(range(8)), list(range(4)), list(range(100 + 50 * i))) for i in range(8)],
             ["channels"])
    checkpoint.save(model, tokenizer, tmp_path / "pruned", spec)
    result = run("export", "vllm", tmp_path / "pruned", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "vllm serve" in result.output and "also serves" not in result.output  # per-layer: only this way
    config = AutoConfig.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert config.model_type == "nemotron-nas" and config.num_attention_heads == 8
    assert [b.ffn.intermediate_size for b in config.block_configs] == [100 + 50 * i for i in range(8)]
    assert {b.attention.n_heads_in_group for b in config.block_configs} == {2}
    assert not hasattr(config.block_configs[0].ffn, "ffn_mult")  # vLLM takes the exact width, not a multiplier
    assert json.loads(config.to_json_string())["block_configs"][3]["ffn"]["intermediate_size"] == 250
    assert sys.modules.get("vllm") is None  # pruneflow never imports vLLM
    dense = run("export", "vllm", REFERENCE, tmp_path / "dense")  # one width everywhere: the export is optional
    assert dense.exit_code == 0 and f"vLLM also serves {REFERENCE} as it is" in " ".join(dense.output.split())


def test_a_bf16_checkpoint_goes_out_bit_for_bit_in_shards(tmp_path, monkeypatch):
    """An 8B model is bf16 and sharded: the export keeps each tensor's bytes and dtype, splits at
    --max-shard-size with save_pretrained's index, and writes no weights for a no-op sub-block."""
    from safetensors import safe_open

    model, tokenizer, spec = checkpoint.load(REFERENCE)
    widths = [300, 688, 0, 120, 256, 64, 17, 500]
    _planned(model, spec, [layer(list(range(8)), list(range(4)), list(range(w))) for w in widths],
             ["subblocks", "channels"])
    checkpoint.save(model, tokenizer, tmp_path / "pruned", spec, dtype=torch.bfloat16)
    bars = record_bars(monkeypatch, deci)
    summary = export_vllm(tmp_path / "pruned", tmp_path / "out", max_shard_size="2MB")
    assert summary["dtype"] == "bfloat16" and summary["no_op_ffn"] == [2]

    def tensors(directory):
        found = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                found.update({name: f.get_tensor(name) for name in f.keys()})
        return found

    source, written = tensors(tmp_path / "pruned"), tensors(tmp_path / "out")
    no_op = {"model.layers.2.post_attention_layernorm.weight"} | {
        f"model.layers.2.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert all(source[name].numel() == 0 for name in no_op if "mlp" in name)  # zero-width in pruneflow's checkpoint
    assert set(written) == set(source) - no_op  # and absent (ffn.no_op) in vLLM's: nothing else added or lost
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, source[name]), name
    assert [(bar.total, bar.n) for bar in bars] == [(sum(t.nbytes for t in source.values()),) * 2]  # progress: read
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = {shard: [n for n, s in index["weight_map"].items() if s == shard] for shard in index["weight_map"].values()}
    assert set(index["weight_map"]) == set(written) and len(shards) > 1
    assert set(shards) == {p.name for p in (tmp_path / "out").glob("*.safetensors")}
    for names in shards.values():  # a shard holds at most 2 MB of tensors, unless it is one larger tensor
        assert len(names) == 1 or sum(written[n].nbytes for n in names) <= 2_000_000, names
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
