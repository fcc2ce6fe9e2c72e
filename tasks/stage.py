"""The pipeline's one stage task: `dvc repro --single-item NAME`, so DVC decides what is up to date.

A stage whose code, params and inputs are unchanged is skipped (or restored from DVC's run-cache) and the
task finishes in a state named ``Cached``; the Prefect UI shows it as such. Transient failures are retried
(bounded); a stage that failed on bad input (pruneflow exits 2) fails at once with its own error message.

Before a stage is run, :func:`up_to_date` asks DVC in this process (``Repo.status``: ~0.3 s, where a ``dvc``
process costs ~1 s of start-up) whether it is; a stage DVC reports unchanged is not run at all. The source
stage, which DVC always runs (``always_changed``), is re-checked here with the library's own fingerprint of the
model and skipped when that equals its recorded output. What DVC reports is only trusted until a stage runs:
after that the next status is asked again.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from pruneflow.errors import PruneflowError

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


class _WithoutTraceback(logging.Filter):
    """Prefect logs the exception a flow ends with, traceback and all. A failed stage (its own error lines are in
    the message) and bad input are no bug: their message is the whole story, in the console and the UI's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (StageFailed, PruneflowError)):
            record.exc_info = record.exc_text = None
        return True


def report_failures_without_traceback() -> None:
    """Install the filter on Prefect's flow-run logger (once per process: the CLI, `serve`, a worker's run)."""
    logger = logging.getLogger("prefect.flow_runs")
    if not any(isinstance(f, _WithoutTraceback) for f in logger.filters):
        logger.addFilter(_WithoutTraceback())


def _retry_if_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as err:
        return err.transient
    except Exception:  # noqa: BLE001 - anything but a stage's own bad-input error may pass on retry
        return True
    return False


def warm_up(repo: Path) -> None:
    """Load what the flow's tasks use (DVC's repository API, MLflow's client and the checkout's tracking store)
    now, e.g. while a temporary Prefect server boots on the other core."""
    from dvc.repo import Repo  # noqa: F401

    from pruneflow.tasks.tracking import open_store

    try:
        open_store(repo)
    except Exception:  # noqa: BLE001 - only a head start: the flow's own checks report a bad URI or store
        pass


def dvc_status(workspace: str) -> dict[str, list]:
    """``dvc status`` of every stage of the workspace, in this process: {stage: what changed}; an
    ``always_changed`` stage with nothing else changed reads ``["always changed"]``."""
    from dvc.repo import Repo

    with Repo(workspace) as repo:
        status = repo.status()
    # DVC addresses stages relative to the working directory: "../ws/dvc.yaml:score" from outside the workspace
    return {key.rpartition(":")[2]: value for key, value in status.items()}


ALWAYS = ["always changed"]


def up_to_date(name: str, workspace: str, status: dict[str, list], state_dir: str | None) -> bool:
    """Whether stage ``name`` needs no run: DVC lists nothing changed for it; for the source stage (always
    changed for DVC), nothing else changed and the model's fingerprint equals artifacts/source.json."""
    changed = status.get(name)
    if not changed:
        return True
    if name != "source" or changed != ALWAYS:
        return False
    import json

    from pruneflow.pipeline.graph import OUTPUTS
    from pruneflow.pipeline.params import load_params
    from pruneflow.model.sources import fingerprint, resolve

    recorded = Path(workspace) / "artifacts" / OUTPUTS["source"]
    try:
        previous = json.loads(recorded.read_text())
        model = load_params(Path(workspace) / "params.yaml").model
        state = Path(state_dir or Path(workspace) / "artifacts" / ".state")
        return fingerprint(resolve(model, base=Path(workspace)), state / "digests.json") == previous
    except Exception:  # noqa: BLE001 - anything unclear (unreadable record, model gone, hub error): run the stage
        return False


def dvc_env(state_dir: str | None = None) -> dict[str, str]:
    """The environment stage commands run in: this interpreter's scripts (pruneflow, dvc) first on PATH, and
    the directory iterative methods resume from (see pruneflow.pipeline.stages.state_dir)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "DVC_NO_ANALYTICS": "1"}
    if state_dir:
        env["PRUNEFLOW_STATE_DIR"] = state_dir
    return env


def dvc_bin() -> str:
    """The dvc installed beside this interpreter (the one whose pruneflow the stages run)."""
    return str(Path(sys.executable).parent / "dvc")


def locked_outputs(workspace: Path, stage: str) -> dict[str, str]:
    """The stage's output hashes as dvc.lock records them."""
    lock = workspace / "dvc.lock"
    if not lock.exists():
        return {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's: ~8× faster on a large dvc.lock
    entry = (yaml.load(lock.read_text(), Loader=loader) or {}).get("stages", {}).get(stage, {})
    return {out["path"]: out.get("md5", "") for out in entry.get("outs", [])}


PROGRESS_EVERY = 10.0  # seconds between progress-bar lines in the run log


def _run_streaming(argv: list[str], cwd: str, logger, env: dict[str, str]) -> tuple[int, str]:
    """Run a stage command, logging its lines as they come (progress bars at most every PROGRESS_EVERY s);
    returns the exit code and the output (progress-bar updates left out)."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    kept, pending, last_progress = [], b"", 0.0
    for chunk in iter(lambda: proc.stdout.read1(65536), b""):
        *lines, pending = re.split(rb"[\r\n]", pending + chunk)  # tqdm redraws with \r
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            if "%|" in line:  # a progress bar
                if time.monotonic() - last_progress >= PROGRESS_EVERY or line.startswith("100%") or "100%|" in line:
                    logger.info(line)
                    last_progress = time.monotonic()
                continue
            kept.append(line)
            logger.info(line)
    if pending.strip():
        kept.append(pending.decode(errors="replace").strip())
    return proc.wait(), "\n".join(kept)


@task(name="stage", task_run_name="{name}", retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=_retry_if_transient, cache_policy=NO_CACHE)
def run_stage(name: str, workspace: str, state_dir: str | None = None, known_up_to_date: bool = False):
    """Reproduce one dvc.yaml stage in ``workspace``; returns {stage, cached, outs} in a Completed/Cached state.
    ``state_dir``: where an iterative method's completed iterations are kept (resume after a crash);
    ``known_up_to_date``: :func:`up_to_date` said so, DVC is not run."""
    logger = get_run_logger()
    if known_up_to_date:
        what = "the model is unchanged" if name == "source" else "up to date (DVC status)"
        logger.info("stage %s: %s, not run", name, what)
        return Completed(name="Cached", message=what,
                         data={"stage": name, "cached": True, "outs": locked_outputs(Path(workspace), name)})
    returncode, output = _run_streaming([dvc_bin(), "repro", "--single-item", name], workspace, logger,
                                        dvc_env(state_dir))
    if returncode != 0:
        raise StageFailed(name, returncode, output)
    cached = any(marker in output for marker in UP_TO_DATE)
    outs = locked_outputs(Path(workspace), name)
    logger.info("stage %s %s", name, "up to date (DVC cache)" if cached else "ran")
    return Completed(name="Cached" if cached else "Completed", message="up to date" if cached else None,
                     data={"stage": name, "cached": cached, "outs": outs})
