"""Models larger than the memory budget: streamed block by block, the same plan and the same weights as in memory.

Tiny models with many layers (weights dominate what streaming holds at once), sharded on disk; a budget
below the model's weights makes ``checkpoint.load(..., stream=True)`` return the streamed skeleton.
"""

import pytest
import torch

from conftest import safetensors_of as _tensors
from conftest import tiny_causal_lm
from memory import LiveTensors
from pruneflow.model import arch as A
from pruneflow.model import checkpoint
from pruneflow.execution import streaming
from pruneflow.errors import PruneflowError
from pruneflow.methods import METHODS
from pruneflow.pipeline.params import BonsaiParams, PruneParams
from pruneflow.prune import prune
from pruneflow.execution.runtime import Runtime, parse_size

WINDOWS = torch.randint(0, 256, (12, 16), generator=torch.Generator().manual_seed(0))  # two batches of 8
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
BUDGET = 1_100_000  # bytes: below the models' weights (≥ 1.9 MB), above one block, its copy and the activations
STREAMED = sorted(name for name, m in METHODS.items() if m.streams)


def _dense(tmp_path, kind="llama", dtype=torch.float32, **overrides):
    path = tmp_path / f"dense-{kind}"
    model = tiny_causal_lm(kind, num_hidden_layers=8, **overrides).to(dtype)
    model.save_pretrained(path, max_shard_size="300KB")  # sharded in
    return path



BONSAI = BonsaiParams(preset="fast", sub_models=8, n_windows=4, rows_per_forward=8, tolerance=0.01)


def _both(dense, method, tmp_path, cfg=None, runtime_dtype=None, budget=BUDGET):
    """Prune ``dense`` in memory and streamed; returns (in-memory result, streamed result, their dirs)."""
    cfg = cfg or PruneParams(ratio=0.3)
    results, dirs = [], []
    for name, budget in (("memory", None), ("streamed", budget)):
        runtime = Runtime(dtype=runtime_dtype, max_memory=budget)
        model, _, spec = checkpoint.load(dense, runtime, with_tokenizer=False, stream=True, calibration=WINDOWS.shape)
        assert streaming.is_streamed(model) == (budget is not None)
        results.append(prune(model, spec, method, cfg, WINDOWS, seed=3, runtime=runtime,
                             options=BONSAI if method == "bonsai" else None))
        out = tmp_path / name
        checkpoint.save(model, None, out, spec, dtype=checkpoint.stored_dtype(dense), max_shard_size="300KB",
                        runtime=runtime)
        dirs.append(out)
    return results, dirs


@pytest.mark.parametrize("method", STREAMED)
def test_streamed_methods_give_the_in_memory_plan_and_identical_weights(method, tmp_path):
    dense = _dense(tmp_path)
    (memory, streamed), (memory_dir, streamed_dir) = _both(dense, method, tmp_path)
    assert streamed.plan.layers == memory.plan.layers and streamed.plan.kept_layers == memory.plan.kept_layers
    assert streamed.plan.params == memory.plan.params
    a, b = _tensors(memory_dir), _tensors(streamed_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a), "streamed weights differ from the in-memory ones"
    assert (streamed_dir / "model.safetensors.index.json").exists()  # sharded out
    assert (memory_dir / "config.json").read_text() == (streamed_dir / "config.json").read_text()
    loaded, _, _ = checkpoint.load(streamed_dir, with_tokenizer=False)
    reference, _, _ = checkpoint.load(memory_dir, with_tokenizer=False)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, reference(input_ids=IDS).logits)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_flap_with_bias_compensation_streams_every_family_identically(kind, tmp_path):
    """qwen2: q/k/v biases and tied embeddings; qwen3: per-head q/k norms; FLAP's bias compensation; global
    allocation (per-layer widths: the per-layer loader's config)."""
    dense = _dense(tmp_path, kind)
    cfg = PruneParams(ratio=0.3, reconstruct="bias", allocation="global")
    (memory, streamed), (memory_dir, streamed_dir) = _both(dense, "flap", tmp_path, cfg)
    assert streamed.plan.layers == memory.plan.layers
    a, b = _tensors(memory_dir), _tensors(streamed_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert any(name.endswith(("o_proj.bias", "down_proj.bias")) for name in b)  # compensation biases


def test_bf16_checkpoint_streams_in_bf16_and_float32_compute(tmp_path):
    """A bf16 checkpoint scored in float32 (--dtype float32) is written back in bf16, as in memory."""
    dense = _dense(tmp_path, dtype=torch.bfloat16)
    (memory, streamed), (memory_dir, streamed_dir) = _both(dense, "wanda_sp", tmp_path, runtime_dtype=torch.float32)
    a, b = _tensors(memory_dir), _tensors(streamed_dir)
    assert {t.dtype for t in b.values()} == {torch.bfloat16}
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert (memory_dir / "config.json").read_text() == (streamed_dir / "config.json").read_text()


def test_at_most_one_block_has_weights_at_a_time(tmp_path, monkeypatch):
    dense = _dense(tmp_path)
    runtime = Runtime(max_memory=BUDGET)
    model, _, spec = checkpoint.load(dense, runtime, with_tokenizer=False, stream=True, calibration=WINDOWS.shape)
    most = []

    def loaded_blocks():
        return sum(any(p.device.type != "meta" for p in block.parameters()) for block in A.blocks(model, spec))

    load = streaming.current_block

    def watched(model_, spec_, i):
        block = load(model_, spec_, i)
        most.append(loaded_blocks() + 1)  # the blocks of the model with weights, and this one
        return block

    monkeypatch.setattr(streaming, "current_block", watched)
    prune(model, spec, "flap", PruneParams(ratio=0.3), WINDOWS, runtime=runtime)
    assert most and max(most) == 1
    assert loaded_blocks() == 0
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing is left behind


def test_a_budget_below_one_block_and_its_activations_is_refused_naming_the_smallest(tmp_path):
    dense = _dense(tmp_path)
    with pytest.raises(PruneflowError, match=r"too small to stream.*need at least [\d.]+ (KiB|MiB)") as err:
        checkpoint.load(dense, Runtime(max_memory=200_000), stream=True, calibration=WINDOWS.shape)
    smallest = parse_size(str(err.value).rsplit("at least ", 1)[1])
    model, _, _ = checkpoint.load(dense, Runtime(max_memory=int(smallest * 1.05)), with_tokenizer=False,
                                  stream=True, calibration=WINDOWS.shape)
    assert streaming.is_streamed(model)


def test_a_step_that_cannot_stream_says_so(tmp_path):
    dense = _dense(tmp_path)
    with pytest.raises(PruneflowError, match="LoRA recovery needs the whole model in memory.*--max-memory"):
        checkpoint.load(dense, Runtime(max_memory=BUDGET), purpose="LoRA recovery")


def test_a_checkpoint_without_safetensors_is_refused(tmp_path):
    dense = _dense(tmp_path)
    for file in dense.glob("*.safetensors*"):
        file.unlink()
    torch.save({}, dense / "pytorch_model.bin")
    with pytest.raises(PruneflowError, match="safetensors"):
        checkpoint.load(dense, Runtime(max_memory=BUDGET), stream=True)


def test_an_interrupted_streamed_save_leaves_no_output(tmp_path, monkeypatch):
    dense = _dense(tmp_path)
    runtime = Runtime(max_memory=BUDGET)
    model, _, spec = checkpoint.load(dense, runtime, with_tokenizer=False, stream=True, calibration=WINDOWS.shape)
    prune(model, spec, "magnitude", PruneParams(ratio=0.3), None, runtime=runtime)
    written = []
    add = streaming.ShardWriter.add

    def dies_after_a_shard(self, name, tensor):
        if len(self.files) >= 2:
            raise KeyboardInterrupt
        written.append(name)
        add(self, name, tensor)

    monkeypatch.setattr(streaming.ShardWriter, "add", dies_after_a_shard)
    out = tmp_path / "pruned"
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(model, None, out, spec, dtype=torch.float32, max_shard_size="100KB", runtime=runtime)
    assert written and not out.exists()
    assert not list(tmp_path.glob(".pruned*")), "the temporary directory was left behind"


@pytest.fixture
def deep_checkpoint(tmp_path, tiny_tokenizer):
    path = tmp_path / "deep"
    tiny_causal_lm("llama", vocab_size=len(tiny_tokenizer), num_hidden_layers=8).save_pretrained(
        path, max_shard_size="500KB")
    tiny_tokenizer.save_pretrained(path)
    return path


def _cli(*args):
    from typer.testing import CliRunner

    from pruneflow.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _prune_cli(model, out, calibration, *extra):
    return _cli("prune", model, "--out", out, "--calibration", calibration, "--n-calibration", 4, "--seqlen", 16,
                "--method", "flap", "--ratio", 0.3, *extra)


def test_cli_prune_with_max_memory_streams_and_matches_the_in_memory_run(deep_checkpoint, calibration_txt, tmp_path):
    memory = _prune_cli(deep_checkpoint, tmp_path / "memory", calibration_txt)
    streamed = _prune_cli(deep_checkpoint, tmp_path / "streamed", calibration_txt, "--max-memory", "1MiB",
                          "--max-shard-size", "400KB")
    assert memory.exit_code == 0, memory.output
    assert streamed.exit_code == 0, streamed.output
    assert "streaming a block at a time" in streamed.output
    a, b = _tensors(tmp_path / "memory"), _tensors(tmp_path / "streamed")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert (tmp_path / "streamed" / "tokenizer.json").exists() and (tmp_path / "streamed" / "plan.json").exists()


@pytest.mark.parametrize("extra, message", [
    (("--max-memory", "1MiB", "--method", "taylor"), "method taylor needs the whole model in memory"),
    (("--max-memory", "1MiB", "--method", "sleb"), "method sleb needs the whole model in memory"),
    (("--max-memory", "1MiB", "--method", "taylor", "--ratio", "0.2"), "methods that stream a block at a time"),
    (("--max-memory", "100KiB"), "too small to stream this model"),
    (("--max-memory", "lots"), "is not a size"),
])
def test_cli_refuses_what_cannot_stream_before_any_work(extra, message, deep_checkpoint, calibration_txt, tmp_path,
                                                         monkeypatch):
    from pruneflow.data import calibration

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran before the input was checked")

    monkeypatch.setattr(calibration, "prepare", no_calibration)
    result = _prune_cli(deep_checkpoint, tmp_path / "out", calibration_txt, *extra)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def _stage_params(path, model, calibration, max_memory, method="flap"):
    import yaml

    path.write_text(yaml.safe_dump({
        "model": str(model), "runtime": {"max_memory": max_memory},
        "calibrate": {"source": str(calibration), "n_windows": 4, "seqlen": 16},
        "score": {"method": method}, "prune": {"ratio": 0.3, "allocation": "global", "reconstruct": "bias"},
        "recover": {"enabled": False}, "evaluate": {"speed": False, "tasks": [], "max_windows": 12, "ppl_seqlen": 16}}))
    return path


def test_every_stage_streams_under_runtime_max_memory_with_recovery_off(deep_checkpoint, calibration_txt, tmp_path):
    from pruneflow.pipeline.graph import STAGES

    for name, budget in (("memory", None), ("streamed", "1MiB")):
        params = _stage_params(tmp_path / f"{name}.yaml", deep_checkpoint, calibration_txt, budget)
        for stage in STAGES:
            result = _cli("stage", stage, "--params", params, "--artifacts", tmp_path / name)
            assert result.exit_code == 0, result.output
    import json

    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("memory", "streamed")]
    for model in ("dense", "pruned"):
        assert metrics[1][model]["test_ppl"] == metrics[0][model]["test_ppl"]
        assert metrics[1][model]["non_embedding_params"] == metrics[0][model]["non_embedding_params"]
    a, b = _tensors(tmp_path / "memory" / "model"), _tensors(tmp_path / "streamed" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert (tmp_path / "memory" / "model" / "config.json").read_text() == \
        (tmp_path / "streamed" / "model" / "config.json").read_text()


def test_the_flow_checks_up_front_that_every_stage_can_stream(deep_checkpoint,
                                                                                      calibration_txt, tmp_path):
    from pruneflow.pipeline.params import load_params
    from pruneflow.pipeline.stages import check_memory

    params = load_params(_stage_params(tmp_path / "p.yaml", deep_checkpoint, calibration_txt, "1MiB"))
    check_memory(params)  # streaming score method, recovery off, perplexity only: every stage streams
    with pytest.raises(PruneflowError, match=r"exceed runtime.max_memory.*recover.enabled: false.*evaluate.tasks"):
        check_memory(params.model_copy(update={
            "recover": params.recover.model_copy(update={"enabled": True}),
            "evaluate": params.evaluate.model_copy(update={"tasks": ["pruneflow_word_order"]})}))
    with pytest.raises(PruneflowError, match="method taylor needs the whole model"):
        check_memory(load_params(_stage_params(tmp_path / "r.yaml", deep_checkpoint, calibration_txt, "1MiB",
                                               method="taylor")))


def test_the_flow_refuses_up_front_a_prune_whose_plan_of_work_does_not_fit(deep_checkpoint, calibration_txt,
                                                                          tmp_path):
    from pruneflow.pipeline.params import load_params
    from pruneflow.pipeline.stages import check_fits

    check_fits(load_params(_stage_params(tmp_path / "p.yaml", deep_checkpoint, calibration_txt, "1MiB")))
    small = load_params(_stage_params(tmp_path / "s.yaml", deep_checkpoint, calibration_txt, "96KiB"))
    with pytest.raises(PruneflowError, match=r"does not fit: the largest phase holds .* above --max-memory 96"):
        check_fits(small)
    relative = small.model_copy(update={"model": deep_checkpoint.name, "runtime": small.runtime.model_copy(
        update={"max_memory": "1MiB"})})  # as the flow gets it: relative to the repository it runs the stages in
    check_fits(relative, base=deep_checkpoint.parent)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: the head is tied to the embedding
def test_streamed_perplexity_equals_the_in_memory_one(kind, tmp_path):
    from pruneflow.evaluation.evaluate import perplexity

    dense = _dense(tmp_path, kind)
    stream = torch.randint(0, 256, (30 * 16,), generator=torch.Generator().manual_seed(2))
    values = []
    for budget in (None, BUDGET):
        runtime = Runtime(max_memory=budget)
        model, _, _ = checkpoint.load(dense, runtime, with_tokenizer=False, stream=True, calibration=(8, 16))
        values.append(perplexity(model, stream, seqlen=16, runtime=runtime))
        assert all(p.device.type == "meta" for p in model.parameters()) == (budget is not None)
    assert values[1] == values[0]


def test_cli_evaluate_refuses_speed_for_a_streamed_model_before_measuring(deep_checkpoint, tmp_path):
    result = _cli("evaluate", deep_checkpoint, "--max-memory", "1MiB", "--max-windows", 4)
    assert result.exit_code == 2
    assert "measures perplexity only: speed need" in " ".join(result.output.split())


@pytest.mark.parametrize("method", ["wanda_sp", "flap"])
def test_bf16_checkpoint_streams_bit_for_bit_computing_in_bf16(method, tmp_path):
    """The checkpoint's own dtype (no --dtype): the forward passes run in bf16, in memory and streamed, and
    give the same plan and the same weights bit for bit."""
    dense = _dense(tmp_path, dtype=torch.bfloat16)
    (memory, streamed), (memory_dir, streamed_dir) = _both(dense, method, tmp_path, PruneParams(ratio=0.3),
                                                           budget=BUDGET // 2)  # bf16 weights: half the bytes
    assert streamed.plan.layers == memory.plan.layers
    a, b = _tensors(memory_dir), _tensors(streamed_dir)
    assert {t.dtype for t in b.values()} == {torch.bfloat16}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_a_budget_just_above_the_claimed_minimum_is_kept(tmp_path):
    """The LM head (64 MiB), a chunk of its logits and a read chunk outweigh a block (15 MiB) several times over:
    the claimed minimum counts them, and a perplexity pass, a FLAP prune and the save, under a budget 5% above
    it, never hold more tensor bytes than the budget (counted at every torch operation)."""
    from pruneflow.evaluation.evaluate import perplexity
    from pruneflow.execution.runtime import Runtime as R

    dense = tmp_path / "dense"
    tiny_causal_lm(vocab_size=32768, num_hidden_layers=12, hidden_size=512, intermediate_size=2048,
                   num_attention_heads=8, num_key_value_heads=4).save_pretrained(dense, max_shard_size="100MB")
    windows = torch.randint(0, 32768, (16, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(PruneflowError, match=r"LM head \(64\.0 MiB\).*need at least") as err:
        checkpoint.load(dense, R(max_memory=4_000_000), stream=True, calibration=windows.shape)
    smallest = parse_size(str(err.value).rsplit("at least ", 1)[1])
    budget = int(smallest * 1.05)
    runtime = R(max_memory=budget)
    model, _, spec = checkpoint.load(dense, runtime, with_tokenizer=False, stream=True, calibration=windows.shape)
    assert streaming.is_streamed(model)
    with LiveTensors() as held:
        perplexity(model, windows.reshape(-1), 16, runtime=runtime)
        prune(model, spec, "flap", PruneParams(ratio=0.3), windows, runtime=runtime)
        checkpoint.save(model, None, tmp_path / "out", spec, dtype=torch.float32, runtime=runtime)
    assert 64 * 2**20 < held.peak <= budget, f"held {held.peak:,} bytes under a budget of {budget:,}"


def test_a_loss_pass_reads_the_embedding_once_for_all_its_batches(tmp_path, monkeypatch):
    """Six batches of the same windows (as Bonsai's sub-models are): one sweep over the embedding, not six; the
    bytes read are counted (what the stages record as bytes_read)."""
    dense = _dense(tmp_path)
    runtime = Runtime(max_memory=BUDGET)
    model, _, spec = checkpoint.load(dense, runtime, with_tokenizer=False, stream=True, calibration=WINDOWS.shape)
    swept, real = [], streaming.LazyWeights.rows

    def rows(self, name, *args):
        swept.append(name)
        return real(self, name, *args)

    monkeypatch.setattr(streaming.LazyWeights, "rows", rows)
    before = streaming.READ["bytes"]
    batches = [WINDOWS[:4]] * 6
    losses = list(streaming.token_nll_batches(model, spec, batches, runtime))
    assert len(losses) == 6 and all(torch.equal(losses[0], nll) for nll in losses)
    assert swept == ["model.embed_tokens.weight"]  # one chunk covers this vocabulary: one read in all
    weights = sum(info.nbytes(torch.float32) for info in streaming.stream_of(model).weights.tensors.values())
    assert weights <= streaming.READ["bytes"] - before  # every block (and the head) at least once
