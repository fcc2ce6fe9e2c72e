"""`pip install` of a built wheel (not editable), in a fresh venv, outside the checkout: the packaged reference
model and corpus are found, `pruneflow demo` and `pruneflow prune` run, and the orchestration code installs as
pruneflow.flows / .tasks / .infra, never as generic top-level names."""

import json
import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel built from the checkout, installed into a new venv whose dependencies are this environment's
    site-packages (a .pth line: its packages, never its editable pruneflow, whose finder a .pth line does not
    run) — so no torch is downloaded again."""
    root = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(root / "dist"), str(REPO)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("pruneflow-*.whl")
    venv.create(root / "venv", with_pip=False)
    python = root / "venv" / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    work = root / "elsewhere"  # no checkout here: nothing can be found through the source tree
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return wheel, python, work, env


def test_the_wheel_has_one_top_level_package_and_ships_its_data(installed):
    wheel, python, work, env = installed
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"pruneflow"}
    for shipped in ("pruneflow/flows/pipeline.py", "pruneflow/tasks/stage.py", "pruneflow/infra/stack.py",
                    "pruneflow/infra/compose.yaml", "pruneflow/_data/data/corpus/test.jsonl.gz",
                    "pruneflow/_data/models/reference/model.safetensors"):
        assert shipped in names
    probe = subprocess.run([python, "-c", "import importlib.util as u, json, pruneflow, pruneflow.flows.pipeline; "
                            "print(json.dumps([pruneflow.__file__] + [bool(u.find_spec(m)) for m in "
                            "('tasks', 'flows', 'infra')]))"], cwd=work, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-3000:]
    where, *generic = json.loads(probe.stdout)
    assert str(REPO) not in where and "site-packages" in where
    assert generic == [False, False, False]


SMALL = ["--set", "calibrate.n_windows=4", "--set", "calibrate.seqlen=64", "--set", "score.method=wanda_sp"]


def test_demo_and_prune_run_on_the_packaged_reference_model_outside_the_checkout(installed):
    _, python, work, env = installed
    cli = [str(python.parent / "pruneflow")]
    demo = subprocess.run([*cli, "demo", *SMALL, "--set", "evaluate.max_windows=2", "--set", "evaluate.speed=false",
                           "--set", "evaluate.tasks=[]", "--out", "demo"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-3000:]
    assert "built-in defaults" in demo.stderr
    rows = json.loads((work / "demo" / "metrics.json").read_text())
    assert set(rows) == {"dense", "wanda_sp −30%"} and all(r["test_ppl"] > 1 for r in rows.values())
    pruned = subprocess.run([*cli, "prune", "models/reference", "--out", "small", "--ratio", "0.2", *SMALL],
                            cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert pruned.returncode == 0, pruned.stdout[-2000:] + pruned.stderr[-3000:]
    assert (work / "small" / "config.json").is_file() and any((work / "small").glob("*.safetensors"))
