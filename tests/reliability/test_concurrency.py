"""Two flow runs started at once on the same workspace: never interleaved. The second either fails at once
naming the cause, or (if it started after the first finished) finds everything cached; the outputs are whole.
(Two isolated override runs at once: the sweep test in tests/integration/test_deployments.py.)"""

import os
import subprocess
import sys
from pathlib import Path

from pruneflow.tasks.stage import dvc_bin
from tests.conftest import dvc_up_to_date


def test_two_runs_at_once_in_place(project):
    argv = [str(Path(sys.executable).parent / "pruneflow"), "run", "--params", str(project / "params.yaml")]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # each its own temporary server
    runs = [subprocess.Popen(argv + ["--name", f"twin-{i}"], cwd=project, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [r.communicate(timeout=600)[0] for r in runs]
    codes = sorted(r.returncode for r in runs)
    assert codes in ([0, 0], [0, 2]), outputs
    if codes == [0, 2]:
        refused = outputs[[r.returncode for r in runs].index(2)]
        assert "another pruneflow run is using" in refused
    status = subprocess.run([dvc_bin(), "status"], cwd=project, capture_output=True, text=True)
    assert status.returncode == 0 and dvc_up_to_date(status.stdout), status.stdout  # whole, consistent
