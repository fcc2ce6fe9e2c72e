"""The pipeline's one stage task: `dvc repro --single-item NAME`, so DVC decides what is up to date.

A stage whose code, params and inputs are unchanged is skipped (or restored from DVC's run-cache) and the
task finishes in a state named ``Cached``; the Prefect UI shows it as such. Transient failures are retried
(bounded); a stage that failed on bad input (pruneflow exits 2) fails at once with its own error message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

UP_TO_DATE = ("didn't change, skipping", "is cached - skipping")


class StageFailed(RuntimeError):
    """A stage command failed; ``transient`` is False for bad input, which no retry can fix."""

    def __init__(self, stage: str, returncode: int, output: str):
        errors = [line.strip() for line in output.splitlines() if line.strip().lower().startswith("error")]
        detail = "; ".join(errors[-3:]) or output.strip()[-1500:]
        super().__init__(f"stage {stage} failed (exit {returncode}): {detail}")
        # a crashed or killed stage command, or a busy DVC lock, may pass on retry; bad input (pruneflow
        # exits 2) and DVC configuration errors (missing params, bad dvc.yaml) cannot
        crashed = "failed to run:" in output and "exited with 2" not in output
        self.transient = crashed or "Unable to acquire lock" in output


def _retry_if_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as err:
        return err.transient
    except Exception:  # noqa: BLE001 - anything but a stage's own bad-input error may pass on retry
        return True
    return False


def dvc_env() -> dict[str, str]:
    """The environment stage commands run in: this interpreter's scripts (pruneflow, dvc) first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1"}


def dvc_bin() -> str:
    """The dvc installed beside this interpreter (the one whose pruneflow the stages run)."""
    return str(Path(sys.executable).parent / "dvc")


def locked_outputs(workspace: Path, stage: str) -> dict[str, str]:
    """The stage's output hashes as dvc.lock records them."""
    lock = workspace / "dvc.lock"
    if not lock.exists():
        return {}
    entry = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage, {})
    return {out["path"]: out.get("md5", "") for out in entry.get("outs", [])}


@task(name="stage", task_run_name="{name}", retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=_retry_if_transient, cache_policy=NO_CACHE)
def run_stage(name: str, workspace: str):
    """Reproduce one dvc.yaml stage in ``workspace``; returns {stage, cached, outs} in a Completed/Cached state."""
    logger = get_run_logger()
    proc = subprocess.run([dvc_bin(), "repro", "--single-item", name], cwd=workspace, env=dvc_env(),
                          capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise StageFailed(name, proc.returncode, output)
    cached = any(marker in proc.stdout for marker in UP_TO_DATE)
    outs = locked_outputs(Path(workspace), name)
    logger.info("stage %s %s", name, "up to date (DVC cache)" if cached else "ran")
    return Completed(name="Cached" if cached else "Completed", message="up to date" if cached else None,
                     data={"stage": name, "cached": cached, "outs": outs})
