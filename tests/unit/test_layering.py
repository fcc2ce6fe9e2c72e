"""The library stays pure: no orchestration/tracking imports outside the CLI composition root."""

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_library_never_imports_prefect_mlflow_or_dvc():
    pattern = re.compile(r"^\s*(import|from)\s+(prefect|mlflow|dvc|pruneflow\.(tasks|flows|infra))\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "pruneflow").rglob("*.py")
                 if p.parent.name != "cli" and pattern.search(p.read_text())]  # the CLI: the composition root
    assert offenders == []


def test_torch_load_is_never_used_without_weights_only():
    offenders = [str(p) for d in ("pruneflow", "tasks", "flows", "benchmarks") for p in (ROOT / d).rglob("*.py")
                 if re.search(r"torch\.load\((?![^)]*weights_only=True)", p.read_text())]
    assert offenders == []


def test_remote_code_is_never_enabled_by_pruneflow():
    import ast

    offenders = []
    for path in (p for d in ("pruneflow", "tasks", "flows") for p in (ROOT / d).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):  # calls only: docs may tell users about the flag
            if isinstance(node, ast.Call):
                offenders += [f"{path}:{node.lineno}" for k in node.keywords if k.arg == "trust_remote_code"
                              and not (isinstance(k.value, ast.Constant) and k.value.value is False)]
    assert offenders == []


def test_modeling_file_shipped_with_checkpoints_depends_on_torch_and_transformers_only():
    source = (ROOT / "pruneflow" / "modeling_pruneflow.py").read_text()
    imports = set(re.findall(r"^\s*(?:from|import)\s+([\w.]+)", source, re.M)) - set(sys.stdlib_module_names)
    assert imports <= {"torch", "transformers"}


def test_dvc_stages_are_real_cli_commands_with_real_params():
    from typer.main import get_command

    from pruneflow import stages as S
    from pruneflow.cli import app
    from pruneflow.params import load_params

    commands = get_command(app).commands
    params = load_params(ROOT / "params.yaml").model_dump()
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(S.STAGES)  # one graph: the library's stages, in order
    upstream: set[str] = set()
    for name, stage in stages.items():
        argv = stage["cmd"].split()
        assert argv[:3] == ["pruneflow", "stage", name] and "stage" in commands, f"stage {name}: {stage['cmd']}"
        for key in stage.get("params", []):
            node = params
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"stage {name}: unknown params key {key}"
                node = node[part]
        for dep in stage["deps"]:  # the model is tracked through the source stage's record, never as a path
            assert dep in upstream or (ROOT / dep).exists(), f"stage {name}: dependency {dep} does not exist"
        assert "${model}" not in stage["deps"]
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", []) + stage.get("metrics", [])]
        expected = ([f"artifacts/{S.REPORT}"] * (name == "evaluate") + [f"artifacts/{S.OUTPUTS[name]}"]
                    + [f"artifacts/{S.RESOURCES}/{name}.json"])
        assert outs == expected, f"stage {name} writes {expected}"
        if name != "source":
            assert "artifacts/source.json" in stage["deps"], f"stage {name} must depend on the model's record"
        upstream.update(outs)


def _import_graph() -> dict[str, set[str]]:
    """pruneflow's modules → the pruneflow modules each imports, function-local imports included."""
    import ast

    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "pruneflow").rglob("*.py")}

    def known(name: str) -> str | None:  # a module, or the module an imported name lives in
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {known(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                edges |= {known(f"{base}.{a.name}") for a in node.names} | {known(base)}
        # a package's __init__ is imported with any of its modules: not an edge of its own here
        graph[name] = {e for e in edges if e and e != name and files[e].name != "__init__.py"}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every cycle of ``graph``, once each (from its smallest module)."""
    found = []

    def walk(node, path, seen):
        for nxt in sorted(graph[node]):
            if nxt == path[0]:
                found.append(" → ".join(path + [nxt]))
            elif nxt not in seen and nxt > path[0]:
                seen.add(nxt)
                walk(nxt, path + [nxt], seen)

    for start in sorted(graph):
        walk(start, [start], {start})
    return found


def test_no_import_cycle_in_the_library():
    """No module of pruneflow/ reaches itself through imports, function-local ones included (they only hide a
    cycle from the interpreter)."""
    assert _cycles(_import_graph()) == []


def test_the_import_graph_counts_function_local_imports_and_the_check_finds_a_cycle():
    graph = _import_graph()
    assert "pruneflow.execution.streaming" in graph["pruneflow.reconstruct"]
    assert "pruneflow.apply" in graph["pruneflow.reconstruct"]  # imported inside refit()
    planted = {**graph, "pruneflow.apply": graph["pruneflow.apply"] | {"pruneflow.reconstruct"}}
    assert any(c.startswith("pruneflow.apply → ") and "pruneflow.reconstruct" in c for c in _cycles(planted))
