"""Bad input: each case gives a clear error naming the cause, exit code 2, and writes nothing.

The cases run the real commands (`pruneflow prune`, `pruneflow stage`, `pruneflow report`) in-process on the
tiny checkpoint; the checkpoint and option cases that `tests/pipeline/test_cli.py` already covers with the same
contract are listed there (ratio above 1 / zero / NaN, unknown method and unit, round-to too large, a ratio
that empties every head, missing / unsupported / truncated / weightless / NaN checkpoints, a source shorter than
one window, an existing output, an output path under a file); this file adds the rest.
"""

import errno
import json
import re
import shutil

import pytest
import yaml

from tests.pipeline.test_cli import prune_args, run


def _params(tmp_path, tiny_checkpoint, calibration_txt, **sections):
    data = {"model": str(tiny_checkpoint),
            "calibrate": {"source": str(calibration_txt), "n_windows": 4, "seqlen": 32},
            "score": {"method": "wanda_sp"}, "prune": {"ratio": 0.25, "allocation": "global"},
            "recover": {"steps": 2, "batch_size": 2, "seqlen": 32},
            "evaluate": {"max_windows": 2, "speed": False, "task_examples": 20}}
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _snapshot(tmp_path):
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


def _big_vocab_tokenizer(tmp_path, tiny_checkpoint):
    path = tmp_path / "bigvocab"
    shutil.copytree(tiny_checkpoint, path)
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = 64  # the tokenizer has 300 tokens: ids past 63 would index outside the embedding
    (path / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            tensors[name] = tensors[name][:64].contiguous()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


PRUNE_CASES = {  # name: (options, expected message)
    "ratio one": (["--ratio", "1"], "prune.ratio: Input should be less than 1"),
    "ratio negative": (["--ratio", "-0.2"], "prune.ratio: Input should be greater than 0"),
    "wrong type": (["--set", "prune.round_to=four"], "prune.round_to: Input should be a valid integer"),
    "unknown key": (["--set", "prune.ratoi=0.3"], "prune.ratoi: Extra inputs are not permitted"),
    "seqlen above max positions": (["--seqlen", "4096"], "calibration seqlen 4096 exceeds the model's max positions"),
    "calibration source missing": (["--calibration", "/nonexistent/calib.txt"], "/nonexistent/calib.txt"),
    "bonsai windows above calibration": (["--method", "bonsai", "--allocation", "global", "--set",
                                          "score.bonsai.n_windows=64"], "score.bonsai.n_windows=64 exceeds"),
    "lora target not a projection": (["--set", "recover.targets=[lm_head]"], "recover.targets: targets must be"),
    "misspelt local task": (["--set", "evaluate.tasks=[pruneflow_word_ordr]"], "unknown local task"),
}


@pytest.mark.parametrize("case", sorted(PRUNE_CASES))
def test_bad_prune_input(case, tiny_checkpoint, calibration_txt, tmp_path):
    options, message = PRUNE_CASES[case]
    out = tmp_path / "pruned"
    result = run(*prune_args(tiny_checkpoint, out, calibration_txt), *options)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "loading" not in result.output  # refused before the model is read (minutes for a large one)
    assert _snapshot(tmp_path) == []


def test_empty_calibration_source(tiny_checkpoint, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run(*prune_args(tiny_checkpoint, tmp_path / "pruned", empty))
    assert result.exit_code == 2 and re.search(r"empty|no text|fewer than one", result.output), result.output
    assert _snapshot(tmp_path) == ["empty.txt"]


def test_tokenizer_larger_than_the_embedding(tiny_checkpoint, calibration_txt, tmp_path):
    model = _big_vocab_tokenizer(tmp_path, tiny_checkpoint)
    before = _snapshot(tmp_path)
    result = run(*prune_args(model, tmp_path / "pruned", calibration_txt))
    assert result.exit_code == 2 and "tokenizer has 300 tokens but the model's embedding only 64" in result.output
    assert _snapshot(tmp_path) == before


def test_params_file_that_is_not_yaml(tiny_checkpoint, calibration_txt, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("prune: [ratio: 0.3\n")
    result = run(*prune_args(tiny_checkpoint, tmp_path / "pruned", calibration_txt, "--params", params))
    assert result.exit_code == 2 and "params.yaml is not valid YAML" in result.output
    assert _snapshot(tmp_path) == ["params.yaml"]


def test_params_file_that_is_yaml_but_not_a_mapping(tiny_checkpoint, calibration_txt, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("- 0.3\n")
    result = run(*prune_args(tiny_checkpoint, tmp_path / "pruned", calibration_txt, "--params", params))
    assert result.exit_code == 2 and "expected a mapping of sections" in result.output


def test_output_dir_not_writable(tiny_checkpoint, calibration_txt, tmp_path):
    # running as root makes chmod meaningless; /proc refuses new directories to everyone
    result = run(*prune_args(tiny_checkpoint, "/proc/pruneflow-out/pruned", calibration_txt))
    assert result.exit_code == 2 and "is not a writable directory" in result.output


def test_disk_full_on_save_leaves_nothing(tiny_checkpoint, calibration_txt, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def full_disk(self, directory, *args, **kwargs):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    out = tmp_path / "pruned"
    result = run(*prune_args(tiny_checkpoint, out, calibration_txt))
    assert result.exit_code == 2 and "(No space left on device); nothing was written" in result.output
    assert _snapshot(tmp_path) == []  # no partial checkpoint, no temp dir


def test_disk_full_keeps_the_previous_output(tiny_checkpoint, calibration_txt, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    out = tmp_path / "pruned"
    assert run(*prune_args(tiny_checkpoint, out, calibration_txt)).exit_code == 0
    before = (out / "model.safetensors").read_bytes()

    def full_disk(self, directory, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    result = run(*prune_args(tiny_checkpoint, out, calibration_txt, "--force", "--ratio", "0.4"))
    assert result.exit_code == 2 and "nothing was written" in result.output
    assert (out / "model.safetensors").read_bytes() == before


def test_unknown_lm_eval_task_fails_the_evaluate_stage_before_evaluating(tiny_checkpoint, calibration_txt, tmp_path):
    params = _params(tmp_path, tiny_checkpoint, calibration_txt, recover={"enabled": False})
    artifacts = tmp_path / "artifacts"
    for name in ("calibrate", "score", "prune", "recover"):
        assert run("stage", name, "--params", params, "--artifacts", artifacts).exit_code == 0
    result = run("stage", "evaluate", "--params", params, "--artifacts", artifacts, "--set",
                 "evaluate.tasks=[hellaswag_typo]")
    assert result.exit_code == 2 and "unknown lm-eval task(s) hellaswag_typo" in result.output
    assert not (artifacts / "metrics.json").exists() and not (artifacts / "report").exists()


def test_lora_target_the_model_does_not_have(tmp_path, calibration_txt):
    from conftest import tiny_bert

    bert = tmp_path / "bert"
    tiny_bert().save_pretrained(bert)
    from pruneflow.errors import PruneflowError
    from pruneflow.pipeline.params import RecoverParams
    from pruneflow.pipeline.recover import recover

    import torch
    from pruneflow.model import checkpoint

    model, _, spec = checkpoint.load(bert, with_tokenizer=False)
    with pytest.raises(PruneflowError, match="recover.targets: 'gate' is not a module of this model"):
        recover(model, torch.zeros(2, 8, dtype=torch.long), spec, RecoverParams(targets=["gate"]))


def test_report_of_a_file_that_is_not_json(tmp_path):
    bad = tmp_path / "metrics.json"
    bad.write_text("{not json")
    result = run("report", bad, "--out", tmp_path / "cmp")
    assert result.exit_code == 2 and "is not valid JSON" in result.output
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("options, message", [
    (["--s3-port", "99999"], "--s3-port 99999: a port is a number from 1 to 65535"),
    (["--prefect-port", "0"], "--prefect-port 0: a port is a number from 1 to 65535"),
    (["--mlflow-port", "4200"], "--mlflow-port and --prefect-port are both 4200"),
    (["--ray", "--s3-port", "6379"], "--s3-port and Ray's GCS port are both 6379"),
    (["--timeout", "0"], "--timeout 0: the seconds each service may take to answer must be positive"),
    (None, "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")])  # None: no credentials in the environment
def test_up_refuses_bad_options_before_creating_anything(options, message, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "pruneflow-test") if options is not None else monkeypatch.delenv(name, raising=False)
    result = run("up", "--run-dir", tmp_path / "stack", *(options or []))
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert _snapshot(tmp_path) == []


def test_up_refuses_a_run_dir_it_cannot_use(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "pruneflow-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "pruneflow-test")
    (tmp_path / "afile").write_text("mine")
    a_file = run("up", "--run-dir", tmp_path / "afile")
    assert a_file.exit_code == 2 and "is a file: the stack needs a directory" in a_file.output
    from pruneflow.infra.stack import free_ports

    ports = [f"--{name}-port={port}" for name, port in zip(("s3", "mlflow", "prefect"), free_ports(3))]  # checked before the mkdir
    under = run("up", "--run-dir", tmp_path / "afile" / "stack", *ports)  # no directory can be made under a file
    assert under.exit_code == 2 and "cannot create the stack's directory" in under.output
    assert "Traceback" not in a_file.output + under.output and (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("uri", ["htp://127.0.0.1:5000", "http:///no-host", "http://host:5000/ spaces"])
def test_malformed_mlflow_uri_fails_before_any_work(uri, project, monkeypatch):
    from prefect.logging import disable_run_logger

    from pruneflow.errors import PruneflowError
    from pruneflow.tasks.remote import preflight

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with disable_run_logger(), pytest.raises(PruneflowError, match="is not a tracking URI MLflow can use"):
        preflight.fn(str(project))
    result = run("run", "--params", project / "params.yaml")
    assert result.exit_code == 2 and "is not a tracking URI MLflow can use" in result.output
    assert not (project / "artifacts").exists()


def test_dvc_yaml_out_of_sync_with_the_code(project):
    from pruneflow.flows.pipeline import stage_names
    from pruneflow.errors import PruneflowError

    dvc = yaml.safe_load((project / "dvc.yaml").read_text())
    del dvc["stages"]["recover"]
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    with pytest.raises(PruneflowError, match="out of sync with this pruneflow.*found source, calibrate, score, prune, evaluate"):
        stage_names(project)
    dvc["stages"]["recover"] = {"cmd": "pruneflow stage recovr"}
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    with pytest.raises(PruneflowError, match="out of sync"):
        stage_names(project)
