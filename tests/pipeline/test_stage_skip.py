"""What the flow decides without running DVC (tasks.stage.up_to_date): a stage DVC's status does not list is
up to date; the always-changed source stage is up to date only while the model's fingerprint equals its
recorded output."""

import json
import shutil

import yaml


def _workspace(tmp_path, tiny_checkpoint):
    from pruneflow.model.sources import fingerprint, resolve

    shutil.copytree(tiny_checkpoint, tmp_path / "models" / "tiny")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": "models/tiny"}))
    (tmp_path / "artifacts").mkdir()
    record = fingerprint(resolve("models/tiny", base=tmp_path))
    (tmp_path / "artifacts" / "source.json").write_text(json.dumps(record))
    return tmp_path


def test_the_source_stage_is_skipped_only_while_the_model_is_unchanged(tmp_path, tiny_checkpoint):
    from pruneflow.tasks.stage import ALWAYS, up_to_date

    ws = _workspace(tmp_path, tiny_checkpoint)
    state = str(tmp_path / "state")
    assert up_to_date("source", str(ws), {"source": ALWAYS}, state)
    assert up_to_date("source", str(ws), {"source": ALWAYS}, state)  # again, from the digest cache
    # its code or params changed: DVC lists more than "always changed"
    assert not up_to_date("source", str(ws), {"source": ALWAYS + [{"changed deps": {}}]}, state)
    (ws / "models" / "tiny" / "config.json").write_text(
        (ws / "models" / "tiny" / "config.json").read_text().replace("{", '{"edited": 1, ', 1))
    assert not up_to_date("source", str(ws), {"source": ALWAYS}, state)  # same name, other content
    (ws / "artifacts" / "source.json").unlink()
    assert not up_to_date("source", str(ws), {"source": ALWAYS}, state)  # nothing recorded: run it


def test_other_stages_follow_dvc_status(tmp_path):
    from pruneflow.tasks.stage import ALWAYS, up_to_date

    status = {"source": ALWAYS, "score": [{"changed outs": {"artifacts/scores": "deleted"}}]}
    assert up_to_date("calibrate", str(tmp_path), status, None)
    assert not up_to_date("score", str(tmp_path), status, None)


def test_dvc_status_names_stages_whatever_the_working_directory(tmp_path, monkeypatch):
    """In process, DVC names a stage of another directory's dvc.yaml "../ws/dvc.yaml:NAME"."""
    from tests.conftest import sh
    from pruneflow.tasks.stage import dvc_bin, dvc_status

    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "dvc.yaml").write_text("stages:\n  make:\n    cmd: echo hi > out.txt\n    outs: [out.txt]\n")
    sh(["git", "init", "-q"], ws)
    sh([dvc_bin(), "init", "-q"], ws)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert set(dvc_status(str(ws))) == {"make"}
