"""Shared fixtures: tiny models built in seconds (never the reference model, never a hub)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # stage subprocesses: tiny models, one thread is fastest
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest
import torch

torch.set_num_threads(1)  # 2 contended threads are far slower than 1 for tiny models


class _CurrentStderr:
    """Whatever sys.stderr is at the time of the write."""

    def write(self, text):
        return sys.stderr.write(text)

    def flush(self):
        sys.stderr.flush()


def _prefect_console_follows_stderr() -> None:
    """Prefect's console log handler keeps the stream that was sys.stderr when its logging was set up: set up
    inside a CliRunner test, it writes to that test's closed stream from then on (each log line an error,
    chained until RecursionError); set up here, to pytest's capture, which is closed before the temporary
    Prefect server logs its shutdown at exit. Point it at the current sys.stderr instead."""
    import logging

    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    for handler in {h for lg in loggers for h in getattr(lg, "handlers", [])}:
        if isinstance(handler, PrefectConsoleHandler):
            handler.setStream(_CurrentStderr())
            handler.console.file = handler.stream


_prefect_console_follows_stderr()

# Tests that start servers or run whole pipelines go first: with parallel workers (`pytest -n 2 --dist
# loadgroup`, as `make test` runs) the long ones then never start last on one worker while the other idles.
LONG_FIRST = ("tests/integration/", "tests/reliability/", "tests/pipeline/test_flow.py",
              "tests/pipeline/test_reference_model.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(LONG_FIRST))  # stable: the order within each part


TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


def tiny_causal_lm(kind: str = "llama", vocab_size: int = 256, seed: int = 0, **overrides):
    """A randomly initialised tiny GQA causal LM of one supported family."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_cls, model_cls = classes[kind]
    torch.manual_seed(seed)
    kwargs = {**TINY, "vocab_size": vocab_size, "tie_word_embeddings": kind == "qwen2", **overrides}
    if kind == "qwen3":
        kwargs.setdefault("head_dim", 16)
    model = model_cls(config_cls(**kwargs)).eval()
    _randomize_norms(model)
    return model


MOE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=512, num_experts_per_tok=2)


def tiny_moe(kind: str = "qwen3_moe", vocab_size: int = 256, seed: int = 0, experts: int = 8,
             dead: tuple[int, ...] = (), **overrides):
    """A randomly initialised tiny Mixture-of-Experts causal LM (transformers 5's fused experts): routers with
    spread logits (std 4 per token) so routing is decisive; the ``dead`` experts of every layer get a zero
    router row and zero output (rarely routed, contributing nothing when they are)."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    if kind == "qwen3_moe":
        config = Qwen3MoeConfig(**{**MOE, "vocab_size": vocab_size, "num_experts": experts, "moe_intermediate_size": 32,
                                   "intermediate_size": 96, "head_dim": 16, "norm_topk_prob": True, **overrides})
        model = Qwen3MoeForCausalLM(config)
    else:
        config = MixtralConfig(**{**MOE, "vocab_size": vocab_size, "num_local_experts": experts,
                                  "intermediate_size": 32, **overrides})
        model = MixtralForCausalLM(config)
    model.eval()
    _randomize_norms(model)
    with torch.no_grad():
        for layer in model.model.layers:
            router, fused = layer.mlp.gate, layer.mlp.experts
            router.weight.normal_(0, 4 / config.hidden_size ** 0.5)  # normed inputs: logits of std ≈ 4
            fused.gate_up_proj.normal_(0, 0.1)
            fused.down_proj.normal_(0, 0.1)
            for e in dead:
                router.weight[e] = 0
                fused.down_proj[e] = 0
    return model


def per_layer_round_trip(model, spec, out, ids):
    """Save ``model`` (per-layer widths) to ``out`` and load it back both ways — pruneflow's loader and plain
    transformers with the copied remote code — each giving ``model``'s logits on ``ids`` exactly; returns the
    first."""
    from transformers import AutoModelForCausalLM

    from pruneflow.model import checkpoint

    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert not checkpoint.save(model, None, out, spec)["vanilla"]
    loaded, _, _ = checkpoint.load(out, with_tokenizer=False)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, logits)
        assert torch.equal(remote(input_ids=ids).logits, logits)
    return loaded


def safetensors_of(path) -> dict:
    """Every tensor of a checkpoint directory's safetensors files, by name."""
    from safetensors import safe_open

    out = {}
    for file in Path(path).glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def tiny_bert(vocab_size: int = 256, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128)
    return BertModel(config, add_pooling_layer=False).eval()


def _randomize_norms(model) -> None:
    """Give RMSNorm weights non-trivial values so head/channel slicing errors show up in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from pruneflow.data import corpus
    from pruneflow.data.reference import train_tokenizer

    return train_tokenizer(corpus.load_split("validation")[:200], vocab_size=300)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer):
    """A saved tiny GQA Llama with a tokenizer, as a user's checkpoint directory."""
    path = tmp_path_factory.mktemp("tiny") / "llama"
    model = tiny_causal_lm("llama", vocab_size=len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def hub_cache(cache: Path, repo_id: str, files_from: Path, revision: str = "main", commit: str | None = None) -> str:
    """Put ``files_from``'s files into a Hugging Face cache laid out as huggingface_hub writes it:
    ``models--ORG--NAME/blobs/<sha256>``, ``snapshots/<commit>/<file>`` symlinked to the blobs, ``refs/<revision>``
    holding the commit. Returns the commit."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in files_from.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(files_from)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


@pytest.fixture(scope="session")
def bf16_checkpoint(tmp_path_factory, tiny_tokenizer):
    """The tiny GQA Llama stored in bfloat16 and sharded (model.safetensors.index.json), as hub models are."""
    path = tmp_path_factory.mktemp("bf16") / "llama"
    model = tiny_causal_lm("llama", vocab_size=len(tiny_tokenizer)).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def moe_checkpoint(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Qwen3-MoE with a tokenizer, as a user's checkpoint directory."""
    path = tmp_path_factory.mktemp("moe") / "qwen3_moe"
    tiny_moe("qwen3_moe", vocab_size=len(tiny_tokenizer), num_hidden_layers=3).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def calibration_txt(tmp_path_factory):
    from pruneflow.data import corpus

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(corpus.load_split("validation")[:40]))
    return path


REPO = Path(__file__).resolve().parents[1]


def dvc_up_to_date(status_stdout: str) -> bool:
    """`dvc status` says nothing is stale but the source stage, which it always lists (``always_changed``: it
    re-checks the model on every run)."""
    lines = [line.strip() for line in status_stdout.strip().splitlines() if line.strip()]
    return lines in ([], ["Data and pipelines are up to date."], ["source:", "always changed"])
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}


def interruptible() -> None:
    """``preexec_fn`` for a process a test stops with SIGINT: a shell's background job (``make test &``) starts
    with SIGINT ignored, the child would inherit that and Python would install no KeyboardInterrupt handler."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def sh(args, cwd):
    import os

    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env={**os.environ, **GIT_ENV})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def project(tmp_path, tiny_checkpoint, calibration_txt):
    """A user's checkout of the project, with the tiny model as its `model` and a committed HEAD."""
    return make_project(tmp_path, tiny_checkpoint, calibration_txt)


def make_project(tmp_path, tiny_checkpoint, calibration_txt):
    import yaml

    from pruneflow.pipeline.params import Params
    from pruneflow.tasks.stage import dvc_bin

    repo = tmp_path / "project"
    repo.mkdir()
    shutil.copy(REPO / "dvc.yaml", repo)
    shutil.copytree(REPO / "pruneflow", repo / "pruneflow", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "data" / "corpus", repo / "data" / "corpus")
    shutil.copytree(tiny_checkpoint, repo / "models" / "tiny")
    shutil.copy(calibration_txt, repo / "calib.txt")
    params = Params.model_validate({
        "model": "models/tiny", "calibrate": {"source": "calib.txt", "n_windows": 4, "seqlen": 32},
        "score": {"method": "wanda_sp"}, "prune": {"ratio": 0.25, "allocation": "global"},
        "recover": {"steps": 3, "batch_size": 2, "seqlen": 32, "warmup_steps": 1},
        "evaluate": {"max_windows": 4, "speed": False, "task_examples": 20}, "export": {"formats": ["gguf"]}})
    (repo / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    dvc = dvc_bin()
    sh(["git", "init", "-q"], repo)
    sh([dvc, "init", "-q"], repo)
    sh([dvc, "config", "core.analytics", "false"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "project"], repo)
    return repo


# the real local stack (SeaweedFS, MLflow server, Prefect server), started once for the integration tests
KEY, SECRET = "pruneflow-test", "pruneflow-test-secret"


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    import json
    import os

    from pruneflow.infra.stack import free_ports
    from tests.pipeline.test_cli import run as run_cli

    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = KEY, SECRET
    run_dir = tmp_path_factory.mktemp("stack")
    ports = dict(zip(("s3", "mlflow", "prefect"), free_ports(3)))
    result = run_cli("up", "--run-dir", run_dir, "--s3-port", ports["s3"], "--mlflow-port", ports["mlflow"],
                     "--prefect-port", ports["prefect"])
    try:
        assert result.exit_code == 0, result.output
        yield run_dir, json.loads((run_dir / "stack.json").read_text())
    finally:
        run_cli("down", "--run-dir", run_dir)
        os.environ.pop("AWS_ACCESS_KEY_ID")
        os.environ.pop("AWS_SECRET_ACCESS_KEY")




def record_bars(monkeypatch, module) -> list:
    """Every tqdm progress bar ``module`` opens from now on (its ``tqdm`` replaced by a subclass that keeps them)."""
    from tqdm import tqdm

    bars = []

    class Recorded(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(module, "tqdm", Recorded)
    return bars
