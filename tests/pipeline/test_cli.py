"""The `pruneflow` command: the prune contract, and bad input → clear error, exit ≠ 0, nothing written."""

import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pruneflow.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def prune_args(model, out, calib, *extra):
    return ("prune", model, "--out", out, "--calibration", calib, "--n-calibration", 4, "--seqlen", 32, *extra)


def test_prune_writes_a_checkpoint_and_prints_the_table(tiny_checkpoint, calibration_txt, tmp_path):
    out = tmp_path / "pruned"
    result = run(*prune_args(tiny_checkpoint, out, calibration_txt, "--method", "wanda_sp", "--ratio", 0.3,
                             "--units", "channels,heads", "--allocation", "uniform", "--round-to", 4, "--seed", 1))
    assert result.exit_code == 0, result.output
    for name in ("config.json", "model.safetensors", "plan.json", "calibration.json", "tokenizer.json"):
        assert (out / name).exists(), name
    assert "achieved ratio" in result.output and "non-embedding" in result.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == "wanda_sp" and plan["round_to"] == 4 and plan["seed"] == 1
    assert abs(plan["params"]["achieved_ratio"] - 0.3) < 0.02
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["source"] == str(calibration_txt) and calibration["n_windows"] == 4


def test_console_script_runs_as_a_process(tiny_checkpoint, calibration_txt, tmp_path):
    exe = shutil.which("pruneflow") or str((__import__("pathlib").Path(sys.executable).parent / "pruneflow"))
    out = tmp_path / "pruned"
    proc = subprocess.run([exe, *map(str, prune_args(tiny_checkpoint, out, calibration_txt, "--ratio", "0.2"))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").exists()


def _unsupported(tmp_path):
    path = tmp_path / "gpt2"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (path / "model.safetensors").write_bytes(b"")
    return path


def _truncated(tmp_path, tiny_checkpoint):
    path = tmp_path / "truncated"
    shutil.copytree(tiny_checkpoint, path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return path


def _no_weights(tmp_path, tiny_checkpoint):
    path = tmp_path / "noweights"
    shutil.copytree(tiny_checkpoint, path)
    (path / "model.safetensors").unlink()
    return path


def _nan_weights(tmp_path, tiny_checkpoint):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "nan"
    shutil.copytree(tiny_checkpoint, path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


BAD = {
    "ratio above 1": (lambda t, c: [], ["--ratio", 1.2], "prune.ratio: Input should be less than 1"),
    "ratio zero": (lambda t, c: [], ["--ratio", 0], "prune.ratio: Input should be greater than 0"),
    "ratio NaN": (lambda t, c: [], ["--ratio", "nan"], "prune.ratio: Input should be a finite number"),
    "unknown method": (lambda t, c: [], ["--method", "obs"], "score.method: unknown method 'obs'"),
    "unknown unit": (lambda t, c: [], ["--units", "channels,blocks"], "prune.units"),
    "bad allocation": (lambda t, c: [], ["--allocation", "greedy"], "prune.allocation"),
    "round-to too large": (lambda t, c: [], ["--round-to", 512], "prune.round_to=512 is larger than layer 0"),
    "empties attention": (lambda t, c: [], ["--ratio", 0.9, "--allocation", "uniform", "--units", "heads"],
                          "would remove all attention heads of layer 0"),
    "cuda without CUDA": (lambda t, c: [], ["--device", "cuda"], "device 'cuda': this torch build has no CUDA"),
    "cuda:1 without CUDA": (lambda t, c: [], ["--device", "cuda:1"], "device 'cuda:1': this torch build has no"),
    "mps elsewhere": (lambda t, c: [], ["--device", "mps"], "device 'mps': MPS (Apple GPU) is not available here"),
    "unknown device": (lambda t, c: [], ["--device", "gpu"], "runtime.device: use auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    "unknown dtype": (lambda t, c: [], ["--dtype", "int8"], "runtime.dtype: Input should be 'auto', 'bfloat16'"),
    "bonsai uniform": (lambda t, c: [], ["--method", "bonsai", "--allocation", "uniform"],
                       "prune.allocation: bonsai removes units globally"),
    "depth method, width units": (lambda t, c: [], ["--method", "sleb", "--units", "channels"],
                                  "prune.units: method sleb scores layers, not channels"),
    "width method, layers": (lambda t, c: [], ["--method", "flap", "--units", "layers"],
                             "prune.units: method flap scores heads, channels, not layers; depth methods"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_options_fail_cleanly(case, tiny_checkpoint, calibration_txt, tmp_path):
    _, extra, message = BAD[case]
    out = tmp_path / "pruned"
    result = run(*prune_args(tiny_checkpoint, out, calibration_txt, *map(str, extra)))
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case,message", [
    ("missing", "checkpoint directory .* does not exist"),
    ("unsupported", "unsupported model type 'gpt2'; supported: bert, llama, mistral, mixtral, qwen2, qwen3, qwen3_moe"),
    ("truncated", "model.safetensors is not a readable safetensors file"),
    ("no weights", "has no \\*.safetensors weights"),
    ("nan", "weight model.layers.0.mlp.down_proj.weight contains NaN or Inf"),
])
def test_bad_checkpoints_fail_cleanly(case, message, tiny_checkpoint, calibration_txt, tmp_path):
    import re

    makers = {"missing": lambda: tmp_path / "nope", "unsupported": lambda: _unsupported(tmp_path),
              "truncated": lambda: _truncated(tmp_path, tiny_checkpoint),
              "no weights": lambda: _no_weights(tmp_path, tiny_checkpoint),
              "nan": lambda: _nan_weights(tmp_path, tiny_checkpoint)}
    model = makers[case]()
    out = tmp_path / "pruned"
    result = run(*prune_args(model, out, calibration_txt))
    assert result.exit_code == 2
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--method", "taylor"], "method taylor needs gradients of the next-token loss and a causal LM; this model is an "
                             "encoder: use"),
    (["--method", "sleb", "--objective", "kl"], "score.objective: kl compares next-token predictions and needs a "
                                                "causal LM; this model is an encoder: use objective hidden"),
    (["--method", "bonsai", "--objective", "loss", "--set", "score.bonsai.n_windows=4"],
     "score.objective: loss compares next-token predictions"),
    (["--method", "flap", "--objective", "hidden"], "score.objective: hidden measures candidate sub-models, and "
                                                    "method flap with prune.allocation: global scores none"),
])
def test_what_an_encoder_cannot_be_pruned_with_is_refused_before_any_work(extra, message, tmp_path, calibration_txt,
                                                                          tiny_tokenizer):
    from conftest import tiny_bert

    path = tmp_path / "bert"
    tiny_bert(vocab_size=len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    result = run(*prune_args(path, tmp_path / "pruned", calibration_txt, *extra))
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "calibration:" not in result.output and not (tmp_path / "pruned").exists()


def test_the_allocation_search_on_an_encoder_by_next_token_loss_is_refused_before_any_work(tmp_path, calibration_txt,
                                                                                         tiny_tokenizer):
    """It was refused only after the calibration forward pass, by the search itself; the search now runs on an
    encoder by the distance of its final hidden states (objective auto or hidden)."""
    from conftest import tiny_bert

    path = tmp_path / "bert"
    tiny_bert(vocab_size=len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    for extra in ([], ["--dry-run"]):
        result = run(*prune_args(path, tmp_path / "pruned", calibration_txt, "--method", "flap", "--allocation",
                                 "search", "--objective", "loss", *extra))
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert "score.objective: loss compares next-token predictions and needs a causal LM" in text
        assert "use objective hidden (or auto)" in text
        assert "calibration:" not in result.output and not (tmp_path / "pruned").exists()


def test_bonsai_just_works_with_its_own_allocation(tiny_checkpoint, calibration_txt, tmp_path):
    """`--method bonsai --ratio R` without --allocation: auto means global for Bonsai."""
    result = run(*prune_args(tiny_checkpoint, tmp_path / "pruned", calibration_txt, "--method", "bonsai",
                             "--ratio", "0.1", "--set", "score.bonsai.preset=fast", "--set",
                             "score.bonsai.sub_models=8", "--set", "score.bonsai.n_windows=4"))
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "pruned" / "plan.json").read_text())
    assert plan["allocation"] == "global" and plan["units"] == ["heads", "channels"]


def test_calibration_source_too_short(tiny_checkpoint, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    result = run(*prune_args(tiny_checkpoint, tmp_path / "pruned", short))
    assert result.exit_code == 2 and "fewer than one 32-token window" in result.output
    assert not (tmp_path / "pruned").exists()


def test_existing_output_is_kept(tiny_checkpoint, calibration_txt, tmp_path):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "notes.txt").write_text("user data")
    result = run(*prune_args(tiny_checkpoint, out, calibration_txt))
    assert result.exit_code == 2 and "already exists" in result.output
    assert (out / "notes.txt").read_text() == "user data"


def test_output_location_that_is_not_a_directory(tiny_checkpoint, calibration_txt, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run(*prune_args(tiny_checkpoint, blocker / "pruned", calibration_txt))
    assert result.exit_code == 2 and f"{blocker} is a file, not a writable directory" in result.output
    assert blocker.read_text() == "not a directory"


def test_calibrate_saves_windows_and_manifest(tiny_checkpoint, calibration_txt, tmp_path):
    from pruneflow.data import calibration as C

    out = tmp_path / "calib"
    result = run("calibrate", tiny_checkpoint, "--out", out, "--source", calibration_txt, "--n-windows", 3,
                 "--seqlen", 16, "--seed", 5)
    assert result.exit_code == 0, result.output
    windows, manifest = C.load(out)
    assert windows.shape == (3, 16) and manifest.seed == 5 and manifest.source == str(calibration_txt)
    again = run("calibrate", tiny_checkpoint, "--out", out, "--source", calibration_txt)
    assert again.exit_code == 2 and "already exists" in again.output
    longer = run("calibrate", tiny_checkpoint, "--out", tmp_path / "long", "--source", calibration_txt, "--seqlen", 513)
    assert longer.exit_code == 2 and "seqlen 513 exceeds the model's max positions (512)" in longer.output
    assert not (tmp_path / "long").exists()


def test_params_file_with_unknown_key_names_it(tiny_checkpoint, calibration_txt, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("prune:\n  ratio: 0.3\n  ratoi: 0.5\n")
    out = tmp_path / "pruned"
    result = run(*prune_args(tiny_checkpoint, out, calibration_txt, "--params", params))
    assert result.exit_code == 2 and "prune.ratoi: Extra inputs are not permitted" in result.output
    assert not out.exists()


def test_demo_rejects_a_bad_override_before_any_work(tmp_path):
    result = run("demo", "--set", "prune.ratio=2", "--out", tmp_path / "demo")
    assert result.exit_code == 2 and "prune.ratio: Input should be less than 1" in result.output
    assert not (tmp_path / "demo").exists()


def test_loading_a_per_layer_checkpoint_never_prompts_for_remote_code(tiny_checkpoint, calibration_txt, tmp_path):
    out = tmp_path / "pruned"
    assert run(*prune_args(tiny_checkpoint, out, calibration_txt, "--allocation", "global")).exit_code == 0
    assert json.loads((out / "pruneflow.json").read_text())["vanilla"] is False
    code = f"import pruneflow; m, t, s = pruneflow.load({str(out)!r}); print(type(m).__name__, len(t))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # a prompt would read stdin
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "PrunedLlamaForCausalLM" in output and "custom code" not in output


def test_evaluate_compares_checkpoints_in_one_table(tiny_checkpoint, calibration_txt, tmp_path):
    out = tmp_path / "pruned"
    assert run(*prune_args(tiny_checkpoint, out, calibration_txt, "--ratio", 0.5)).exit_code == 0
    result = run("evaluate", tiny_checkpoint, out, "--max-windows", 4, "--threads", 1)
    assert result.exit_code == 0, result.output
    for metric in ("test_ppl", "prefill_ms", "decode_tok_s", "size_mb", "non_embedding_params"):
        assert metric in result.output
    bad = run("evaluate", tiny_checkpoint, "--max-windows", 0)
    assert bad.exit_code == 2 and "evaluate.max_windows: Input should be greater than or equal to 1" in bad.output


def test_calibrate_from_a_per_layer_checkpoint_never_prompts(tiny_checkpoint, calibration_txt, tmp_path):
    out = tmp_path / "pruned"
    assert run(*prune_args(tiny_checkpoint, out, calibration_txt, "--allocation", "global")).exit_code == 0
    assert json.loads((out / "pruneflow.json").read_text())["vanilla"] is False  # config.json has an auto_map
    code = (f"import sys; from pruneflow.cli import app; sys.argv = ['pruneflow', 'calibrate', {str(out)!r}, "
            f"'--out', {str(tmp_path / 'calib')!r}, '--source', {str(calibration_txt)!r}, '--seqlen', '16']; app()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # a prompt would read stdin
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "custom code" not in output and (tmp_path / "calib" / "manifest.json").exists()


def test_the_console_script_exits_although_a_thread_pool_was_never_shut_down():
    """MLflow's artifact uploads leave an idle ThreadPoolExecutor behind; `main` stops it as the interpreter
    would (threading's exit callbacks, then the join) instead of joining its workers forever."""
    script = ("import concurrent.futures, sys\n"
              "pool = concurrent.futures.ThreadPoolExecutor(1)\n"
              "pool.submit(int).result()\n"
              "sys.argv = ['pruneflow', 'methods']\n"
              "from pruneflow.cli import main\n"
              "main()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "minitron" in proc.stdout


def test_the_units_help_names_every_unit_type():
    """`prune --help` lists the units a user can ask for: every unit type of the vocabulary (it once stopped at
    experts while sub-blocks and merged layers could be pruned)."""
    from pruneflow.units import UNIT_TYPES

    result = run("prune", "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())
    units_help = text[text.index("--units"):text.index("--allocation")]
    assert [unit for unit in UNIT_TYPES if unit not in units_help] == []


@pytest.mark.parametrize("command", [("serve",), ("deploy", "--pool", "p")])
def test_pipeline_commands_outside_a_checkout_say_they_need_one(command, tmp_path):
    result = run(*command, "--repo", tmp_path)
    assert result.exit_code == 2, result.output
    assert f"{tmp_path.resolve()} is not in a git checkout of the project" in " ".join(result.output.split())


@pytest.mark.parametrize("command", [("serve",), ("deploy", "--pool", "p"), ("sweep",)])
def test_pipeline_commands_without_a_prefect_server_say_they_need_one(command, monkeypatch):
    """A temporary server would take the deployments with it when the command ends (deploy registered them
    there and said it had, with Prefect's own tracebacks on the way)."""
    from pathlib import Path

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the checkout
    result = run(*command)
    assert result.exit_code == 2, result.output
    assert f"pruneflow {command[0]} needs a Prefect server that outlives it" in " ".join(result.output.split())


@pytest.mark.parametrize("options, message", [
    (("--methods", "nope", "--ratios", "0.2"), "sweep[nope, 0.2].score.method: unknown method 'nope'"),
    (("--methods", "flap", "--ratios", "0.2,x"), "--ratios '0.2,x': comma-separated numbers"),
])
def test_a_bad_sweep_point_is_refused_before_any_flow_run(options, message, monkeypatch):
    """The grid is checked by the command (it was checked inside the sweep's flow run: a Prefect traceback, a
    failed run on the server)."""
    from pathlib import Path

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never reached: the points fail first
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    result = run("sweep", *options)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
