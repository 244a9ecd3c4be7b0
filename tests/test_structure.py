"""The house's structure: imports point down (no circle in l2l/, no function-local import of the
project), every module imports alone, the engine stays free of data preparation, and every DVC
stage depends on each project file it runs."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "l2l"


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(project modules imported at the top level, (line, module) of function-local project imports)."""
    top, local = set(), []
    tree = ast.parse(path.read_text())

    def names(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from l2l.methods import conventional` imports the submodule too
            return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        return []

    for node in ast.walk(tree):
        for name in names(node):
            if name.split(".")[0] != "l2l":
                continue
            mods = [m for m in (name, name.rsplit(".", 1)[0]) if _path(m) is not None]
            if not mods:
                continue
            if node in tree.body or (isinstance(getattr(node, "parent", None), ast.If)):
                top.add(mods[0])
            else:
                local.append((node.lineno, mods[0]))
    return top, local


def _path(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.exists():
            return p
    return None


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p)[0] - {_module(p)} for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_import_circle_and_no_function_local_project_import():
    graph = _graph()
    local = {_module(p): _imports(p)[1] for p in PACKAGE.rglob("*.py") if _imports(p)[1]}
    assert not local, f"function-local imports of the project: {local}"
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_every_module_imports_alone_and_the_engine_needs_no_data_preparation():
    modules = sorted(_module(p) for p in PACKAGE.rglob("*.py"))
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}:\n"
            "    for k in [k for k in sys.modules if k == 'l2l' or k.startswith('l2l.')]:\n"
            "        del sys.modules[k]\n"
            "    importlib.import_module(m)\n"
            "for k in list(sys.modules):\n"
            "    if k.startswith(('l2l', 'PIL', 'torchvision')):\n"
            "        del sys.modules[k]\n"
            "import l2l.engine\n"
            "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in ('PIL', 'torchvision', 'mlflow', 'dvc'))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _closure(start: set[str], graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())
    return seen


def test_dvc_stages_depend_on_every_project_file_they_run():
    graph = _graph()
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, st in stages.items():
        script = REPO / st["cmd"].split()[-1]
        deps = {d if isinstance(d, str) else next(iter(d)) for d in st["deps"]}
        used = _closure(_imports(script)[0], graph)
        files = {str(_path(m).relative_to(REPO)) for m in used}
        missing = sorted(f for f in files if f not in deps and not any(f.startswith(d.rstrip("/") + "/") for d in deps))
        assert str(script.relative_to(REPO)) in deps, f"stage {name}: its script is not a dep"
        assert not missing, f"dvc.yaml stage {name}: runs {missing} but does not depend on them"


def test_no_machine_path_in_the_repository():
    """No absolute path of one machine in any committed file (data sources are settings: run.yaml, --source)."""
    out = subprocess.run(["git", "grep", "-I", "-n", "-E", r"(^|[^A-Za-z0-9_.~-])/(work|home|Users|root|mnt|scratch)/",
                          "HEAD", "--", "."], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 1 and not out.stdout, f"machine paths:\n{out.stdout[:3000]}{out.stderr[-1000:]}"
