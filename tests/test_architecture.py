"""The layout's rules (docs/ARCHITECTURE.md), read from the source with ``ast``: no import cycle between
modules, no private name imported across modules, the allowed direction between packages, and a
docstring on every package."""

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "methods")


def module_files() -> dict[str, Path]:
    """Every module of the project's packages by dotted name (``harness.engine.hook``; a package is its
    ``__init__``)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = module_files()


def imports_of(name: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, imported names, line)`` for every import in a module, at any depth (a lazy
    import inside a function counts: it is an edge all the same). ``from P import m`` where ``P.m`` is a
    module is an edge to ``P.m``; parents a dotted import implies are not edges."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    is_package = MODULES[name].name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in MODULES:
                    out.append((target, [], node.lineno))
                else:
                    out.append((base, [alias.name], node.lineno))
    return [(target, names, line) for target, names, line in out if target.split(".")[0] in PACKAGES]


GRAPH = {name: sorted({target for target, _, _ in imports_of(name) if target in MODULES and target != name})
         for name in MODULES}


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One cycle of the graph as a list of nodes (first = last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for succ in graph.get(node, ()):
            if state.get(succ) == 1:
                return stack[stack.index(succ):] + [succ]
            if succ not in state:
                found = visit(succ)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": []}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None


def test_the_graph_covers_the_packages():
    assert {"harness.engine.hook", "harness.run.runner", "harness.cli", "methods.base"} <= set(GRAPH)
    assert "harness.engine.cache" in GRAPH["harness.engine.hook"]
    assert "methods.base" in GRAPH["harness.engine.hook"]


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_name_imported_across_modules():
    offenders = [f"{name}:{line} imports {target}.{n}" for name in MODULES
                 for target, names, line in imports_of(name) for n in names
                 if n.startswith("_") and not n.startswith("__") and target != name]
    assert not offenders, offenders


#: package -> packages it must never import (docs/ARCHITECTURE.md)
FORBIDDEN = {
    "methods": ("harness",),
    "harness.engine": ("harness.run.runner", "harness.run.identity", "harness.run.distributed", "harness.tasks",
                       "harness.report", "harness.bench", "harness.config", "harness.cli", "harness.longbench"),
    "harness.protocol": ("harness.engine", "harness.run", "harness.tasks", "harness.report", "harness.bench",
                         "harness.cli", "harness.longbench"),
    "harness.longbench": ("harness.report", "harness.engine", "harness.bench", "harness.cli", "harness.run.runner"),
    "harness.ruler": ("harness.report", "harness.engine", "harness.bench", "harness.cli", "harness.run.runner"),
    "harness.tasks": ("harness.report", "harness.bench", "harness.cli", "harness.run.runner"),
    "harness.report": ("harness.engine", "harness.bench", "harness.cli", "harness.run.runner"),
    "harness.run": ("harness.report.table", "harness.report.heatmap", "harness.bench", "harness.cli"),
    "harness.config": ("harness.run.runner", "harness.report", "harness.bench", "harness.cli"),
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_allowed_directions(package):
    bad = [f"{name} -> {target}" for name in MODULES if name == package or name.startswith(package + ".")
           for target in GRAPH[name] if any(target == f or target.startswith(f + ".") for f in FORBIDDEN[package])]
    assert not bad, bad


def test_kvpress_bench_imports_nothing_of_the_project():
    """It runs alone, with kvpress's own transformers on the path."""
    assert not [t for t, _, _ in imports_of("harness.bench.kvpress")]


def test_every_package_says_what_it_is_for():
    packages = [name for name, path in MODULES.items() if path.name == "__init__.py"]
    assert {"harness.engine", "harness.run", "harness.tasks", "harness.longbench", "harness.report", "harness.bench",
            "harness.config", "harness.protocol"} <= set(packages)
    for name in packages:
        doc = ast.get_docstring(ast.parse(MODULES[name].read_text(encoding="utf-8")))
        assert doc and len(doc) > 40, f"{name}: the package docstring says what it is for and what it may import"


def test_scripts_import_no_tests():
    for path in (ROOT / "scripts").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not any(n.split(".")[0] in ("tests", "conftest") or n.startswith("test_") for n in names), path


def test_every_module_is_importable_by_its_name():
    for name in MODULES:
        if name != "harness.bench.kvpress":
            assert importlib.util.find_spec(name) is not None, name


def test_every_public_function_of_methods_and_the_engine_has_a_docstring():
    """methods/ and harness/engine/: every public function, class and public method of a public class."""
    missing = []
    for name, path in MODULES.items():
        if not (name.startswith("methods") or name.startswith("harness.engine")):
            continue

        def visit(body, prefix):
            for node in body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and \
                        not node.name.startswith("_"):
                    if not ast.get_docstring(node):
                        missing.append(f"{name}:{node.lineno} {prefix}{node.name}")
                    if isinstance(node, ast.ClassDef):
                        visit(node.body, f"{prefix}{node.name}.")
        visit(ast.parse(path.read_text(encoding="utf-8")).body, "")
    assert not missing, missing
