"""Models from the Hugging Face hub: hub ids resolved through a real local cache layout (offline), and the
hub's own errors (gated, unknown revision, unknown repo, unreachable) through a local stand-in endpoint."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import hub_cache
from pruneflow.errors import PruneflowError
from pruneflow.model.sources import fingerprint, resolve
from tests.pipeline.test_cli import run

PRUNEFLOW = str(Path(sys.executable).parent / "pruneflow")


@pytest.fixture
def cache(tmp_path, bf16_checkpoint, monkeypatch):
    """A cache holding org/tiny-bf16 at main (and the same commit by hash); huggingface_hub reads it."""
    import huggingface_hub.constants as constants

    root = tmp_path / "hf-cache"
    commit = hub_cache(root, "org/tiny-bf16", bf16_checkpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    return root, commit


def test_a_hub_id_resolves_to_its_cached_snapshot_offline(cache):
    root, commit = cache
    source = resolve("org/tiny-bf16")
    assert source.path == root / "models--org--tiny-bf16" / "snapshots" / commit
    assert (source.repo_id, source.revision, source.commit) == ("org/tiny-bf16", None, commit)
    assert source.pinned == f"org/tiny-bf16@{commit}"
    assert resolve(f"org/tiny-bf16@{commit}").path == source.path
    assert resolve("org/tiny-bf16@main").commit == commit
    record = fingerprint(source)
    assert record["commit"] == commit and len(record["files"]["model.safetensors.index.json"]) == 64


def test_a_local_directory_wins_and_its_fingerprint_is_cached_by_stat(bf16_checkpoint, tmp_path, monkeypatch):
    from conftest import record_bars
    from pruneflow.model import sources

    bars = record_bars(monkeypatch, sources)
    cache_file = tmp_path / "digests.json"
    first = fingerprint(resolve(str(bf16_checkpoint)), cache_file)
    assert set(first["files"]) >= {"config.json", "model.safetensors.index.json"}
    assert json.loads(cache_file.read_text())  # the digests, keyed by path, size, mtime and inode
    assert fingerprint(resolve(str(bf16_checkpoint)), cache_file) == first
    size = sum(p.stat().st_size for p in bf16_checkpoint.rglob("*") if p.is_file() and not p.name.startswith("."))
    # progress over every byte read the first time; the second time nothing is read (the bar is off)
    assert [(bar.total, bar.n) for bar in bars] == [(size, size), (0, 0)]


@pytest.mark.parametrize("name,message", [
    ("org/not-cached", "org/not-cached is neither a local directory nor a model in the Hugging Face cache"),
    ("org/tiny-bf16@v2", "revision 'v2' of org/tiny-bf16 is not in the Hugging Face cache"),
    ("models/no-such-dir", "downloads are off (HF_HUB_OFFLINE=1)"),
    ("/no/such/dir", "checkpoint directory /no/such/dir does not exist"),
    ("./relative/missing", "checkpoint directory ./relative/missing does not exist"),
])
def test_what_is_not_there_offline_is_a_clear_error(cache, name, message):
    with pytest.raises(PruneflowError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(name)


def test_prune_a_cached_bf16_hub_model_from_the_command_line(cache, tmp_path, calibration_txt):
    """The product path as a user runs it: a hub id, offline from the cache, bf16 in and bf16 (smaller) out,
    loadable with transformers."""
    from transformers import AutoModelForCausalLM

    root, _ = cache
    out = tmp_path / "pruned"
    env = {**os.environ, "HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([PRUNEFLOW, "prune", "org/tiny-bf16", "--out", str(out), "--method", "wanda_sp",
                           "--ratio", "0.3", "--calibration", str(calibration_txt), "--n-calibration", "4",
                           "--seqlen", "32", "--head-mode", "group"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    with safe_open(next(out.glob("*.safetensors")), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    snapshot = resolve("org/tiny-bf16").path
    size = lambda d: sum(p.stat().st_size for p in Path(d).glob("*.safetensors"))  # noqa: E731
    assert size(out) < 0.8 * size(snapshot)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert str(model.dtype) == "torch.bfloat16"


class _FakeHub(BaseHTTPRequestHandler):
    """Answers like the hub for three repos: org/gated (gated), org/tiny (no revision v9), anything else (none)."""

    seen: list[str] = []

    def do_GET(self):  # noqa: N802
        self.seen.append(self.path)
        if self.path.startswith("/api/models/org/gated"):
            self._error(403, "GatedRepo", "Access to model org/gated is restricted.")
        elif self.path.startswith("/api/models/org/tiny/revision/v9"):
            self._error(404, "RevisionNotFound", "Invalid rev id: v9")
        else:
            self._error(404, "RepoNotFound", "Repository not found")

    do_HEAD = do_GET

    def _error(self, status: int, code: str, message: str):
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("model,message", [
    ("org/gated", "org/gated is a gated repository: accept its terms on the hub with your account, then set HF_TOKEN"),
    ("org/tiny@v9", "org/tiny has no revision 'v9'"),
    ("org/nothing", "org/nothing is neither a local directory nor a model on the hub"),
])
def test_hub_errors_are_clear_and_write_nothing(fake_hub, tmp_path, model, message):
    """Online (the CLI no longer forces HF_HUB_OFFLINE): the stand-in hub is asked, its answer becomes one
    error line, exit 2, and no output directory appears."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_ENDPOINT": fake_hub, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "cache"),
           "HF_TOKEN": ""}
    proc = subprocess.run([PRUNEFLOW, "prune", model, "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in " ".join(proc.stderr.split()), proc.stderr
    assert not out.exists() and "Traceback" not in proc.stderr
    assert any(p.startswith(f"/api/models/{model.split('@')[0]}") for p in _FakeHub.seen)


def test_an_unreachable_hub_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0",
           "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_ETAG_TIMEOUT": "2"}
    proc = subprocess.run([PRUNEFLOW, "prune", "org/somewhere", "--out", str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "org/somewhere is neither a local directory nor a model in the Hugging Face cache" in proc.stderr
    assert "the hub did not answer" in proc.stderr and not (tmp_path / "out").exists()


def test_the_evaluate_command_takes_hub_ids(cache):
    result = run("evaluate", "org/tiny-bf16", "--max-windows", "2", "--no-speed")
    assert result.exit_code == 0, result.output
    assert "org/tiny-bf16" in result.output and "test_ppl" in result.output
