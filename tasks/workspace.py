"""Where a flow run happens, so that nothing a user made is ever rewritten.

A run whose params equal the checkout's ``params.yaml`` runs in place (`dvc repro`, as a user would), holding
an exclusive lock so two runs cannot interleave in one workspace. A run with other params runs in a detached
``git worktree`` of HEAD that shares the checkout's DVC cache (so unchanged stages are restored, not
recomputed), writes its params there, and is recorded with ``dvc exp save``: it appears in the checkout's
``dvc exp show`` while the checkout's files stay untouched.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pruneflow.errors import PruneflowError
from pruneflow.pipeline.params import Params, load_params
from pruneflow.tasks.stage import dvc_bin, dvc_env


def run_git(args: list[str], cwd: Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PruneflowError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip()[-500:]}")
    return proc.stdout.strip()


def run_dvc(args: list[str], cwd: Path) -> str:
    proc = subprocess.run([dvc_bin(), *args], cwd=cwd, capture_output=True, text=True, env=dvc_env())
    if proc.returncode != 0:
        raise PruneflowError(f"dvc {' '.join(args)} failed in {cwd}: {dvc_error(proc.stderr)}")
    return proc.stdout.strip()


def dvc_error(stderr: str, limit: int = 800) -> str:
    """DVC's ERROR lines (all of its output when it has none), without its support footer; long text keeps
    its end, where the cause is."""
    lines = [line for line in stderr.strip().splitlines()
             if line.strip() and not line.startswith("Having any troubles?")]
    text = "\n".join([line for line in lines if line.startswith("ERROR")] or lines)
    return text if len(text) <= limit else "…" + text[-limit:]


def repo_root(path: str | Path = ".") -> Path:
    """The checkout ``path`` is in (the pipeline's commands need its dvc.yaml, params.yaml and prefect.yaml)."""
    try:
        return Path(run_git(["rev-parse", "--show-toplevel"], Path(path)))
    except PruneflowError:
        raise PruneflowError(f"{Path(path).resolve()} is not in a git checkout of the project: the pipeline's "
                             f"commands (run, serve, deploy, sweep) run in one (clone it, or give --repo / "
                             f"--params the checkout's)") from None


def code_version(repo: Path) -> str:
    """The commit the stages' code comes from (+ ``-dirty`` when tracked files have uncommitted changes)."""
    dirty = run_git(["status", "--porcelain", "--untracked-files=no"], repo)
    return run_git(["rev-parse", "--short=12", "HEAD"], repo) + ("-dirty" if dirty else "")


@contextmanager
def exclusive(repo: Path):
    """Hold the workspace's run lock; a second run fails at once with a clear message instead of interleaving."""
    lock_path = repo / ".dvc" / "tmp" / "pruneflow-run.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PruneflowError(f"another pruneflow run is using {repo}; wait for it, or run with other params "
                                 f"(--set ...), which runs in an isolated worktree") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@task(name="open-workspace", cache_policy=NO_CACHE)
def open_workspace(repo: str, params: Params, run_name: str) -> dict:
    """In place when ``params`` equal the checkout's params.yaml, else a fresh worktree with them written."""
    repo_path = Path(repo)
    if load_params(repo_path / "params.yaml") == params:
        return {"path": str(repo_path), "isolated": False}
    logger = get_run_logger()
    if run_git(["status", "--porcelain", "--untracked-files=no"], repo_path):
        logger.warning("this run uses the committed code at HEAD; uncommitted changes in %s are not in it", repo)
    path = Path(tempfile.mkdtemp(prefix=f"pruneflow-{run_name}-")) / "workspace"
    run_git(["worktree", "add", "--detach", str(path), "HEAD"], repo_path)
    run_dvc(["cache", "dir", "--local", str(repo_path / ".dvc" / "cache")], path)
    (path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    logger.info("isolated run %s in %s", run_name, path)
    return {"path": str(path), "isolated": True}


@task(name="save-experiment", cache_policy=NO_CACHE)
def save_experiment(workspace: dict, run_name: str) -> str:
    """Record an isolated run as a DVC experiment (listed by `dvc exp show` in the checkout)."""
    path = Path(workspace["path"])
    stages = yaml.safe_load((path / "dvc.yaml").read_text())["stages"]
    metrics = [next(iter(m)) if isinstance(m, dict) else m for s in stages.values() for m in s.get("metrics", [])]
    untracked = [f for f in ["dvc.lock", *metrics] if (path / f).exists()]  # new files in a fresh worktree
    # concurrent `dvc exp save`s from worktrees of one repository race on its experiment refs (measured with
    # dvc 3.67: "'NoneType' object is not subscriptable" in a 2-worker sweep), so they take turns
    common = Path(run_git(["rev-parse", "--path-format=absolute", "--git-common-dir"], path))
    with open(common / "pruneflow-exp-save.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            run_dvc(["exp", "save", "--force", "-n", run_name, *[a for f in untracked for a in ("-I", f)]], path)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    return run_name


def close_workspace(repo: str, workspace: dict) -> None:
    if workspace.get("isolated"):
        path = Path(workspace["path"])
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=repo, capture_output=True)
        shutil.rmtree(path.parent, ignore_errors=True)
