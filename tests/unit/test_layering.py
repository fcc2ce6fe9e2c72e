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
    source = (ROOT / "pruneflow" / "model" / "modeling_pruneflow.py").read_text()
    imports = set(re.findall(r"^\s*(?:from|import)\s+([\w.]+)", source, re.M)) - set(sys.stdlib_module_names)
    assert imports <= {"torch", "transformers"}


def test_dvc_stages_are_real_cli_commands_with_real_params():
    from typer.main import get_command

    from pruneflow.pipeline import stages as S
    from pruneflow.cli import app
    from pruneflow.pipeline.params import load_params

    commands = get_command(app).commands
    load_params(ROOT / "params.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())  # what DVC reads: no defaults filled in (a key
    # named here but only defaulted in Params failed `make demo`'s prune stage: "Parameters … are missing")
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
    assert "pruneflow.execution.streaming" in graph["pruneflow.units.reconstruct"]
    assert "pruneflow.units.apply" in graph["pruneflow.units.reconstruct"]
    planted = {**graph, "pruneflow.units.apply": graph["pruneflow.units.apply"] | {"pruneflow.units.reconstruct"}}
    assert any(c.startswith("pruneflow.units.apply → ") and "pruneflow.units.reconstruct" in c for c in _cycles(planted))


def _local_imports(path: Path) -> list[str]:
    """``path``'s imports of pruneflow made inside a function or class body (line: statement)."""
    import ast

    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    return [f"{node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top
            and any(n.startswith("pruneflow") for n in ([node.module or ""] if isinstance(node, ast.ImportFrom)
                                                         else [a.name for a in node.names]))]


def test_pruneflow_modules_import_each_other_at_the_top():
    """Function-local imports are for optional heavy dependencies (peft, lm-eval, ray, onnx ...) only: a
    pruneflow module imported inside a function hides a dependency (and, once, hid an import cycle). Exempt: the
    CLI (the composition root loads a command's modules when it runs) and the package façades' ``__init__``,
    which stay light (``import pruneflow`` and the registries load no torch)."""
    offenders = {str(p.relative_to(ROOT)): found for p in (ROOT / "pruneflow").rglob("*.py")
                 if p.parent.name != "cli" and p.name != "__init__.py" and (found := _local_imports(p))}
    assert offenders == {}


def test_the_local_import_check_finds_one(tmp_path):
    planted = tmp_path / "m.py"
    planted.write_text("import torch\n\ndef f():\n    from pruneflow.units import apply\n    import json\n")
    assert _local_imports(planted) == ["4: from pruneflow.units import apply"]


ROOMS = {"model", "data", "units", "methods", "selection", "execution", "evaluation", "pipeline", "cli"}


def test_the_library_is_rooms_each_saying_what_it_owns_and_may_import():
    """pruneflow/ is a few sub-packages (rooms) and the entry point; each room's docstring says what it owns and
    what it may import."""
    import ast

    package = ROOT / "pruneflow"
    assert {p.name for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == ROOMS
    assert {p.stem for p in package.glob("*.py")} == {"__init__", "prune", "errors", "sizes", "atomic"}
    for room in ROOMS:
        doc = ast.get_docstring(ast.parse((package / room / "__init__.py").read_text())) or ""
        assert len(doc) > 200 and "import" in doc, f"pruneflow/{room}/__init__.py: say what it owns and imports"


def test_only_the_architecture_and_the_moe_units_ask_whether_a_model_is_moe():
    """Generic code asks the MLP strategy (pruneflow.model.mlp) or the unit registry what a Mixture-of-Experts
    block changes; ``spec.moe`` is read only where the architecture is defined and by the expert units."""
    allowed = {"model/arch.py", "model/mlp.py", "units/experts.py", "units/expert_channels.py"}
    readers = {str(p.relative_to(ROOT / "pruneflow")) for p in (ROOT / "pruneflow").rglob("*.py")
               if re.search(r"\bspec\.moe\b", p.read_text())}
    assert readers <= allowed and {"units/experts.py", "model/mlp.py"} <= readers  # the check sees them
