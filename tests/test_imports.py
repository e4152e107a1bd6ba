"""The package's import graph (device-free: reads source only): no cycles, kernels/ imports nothing from
minispin, the core never imports minispin.demo, and no in-function imports of minispin's own modules
except the lazy kernel imports (Triton reads TRITON_INTERPRET once, at import time)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import minispin
from tiny import REPO

# module name -> source file (the package minispin.kernels is the top-level kernels/ folder, see minispin/kernels.py)
ROOTS = {"minispin": REPO / "minispin", "minispin.kernels": REPO / "kernels"}
# in-function imports allowed: the kernels, whose import must wait for the caller's TRITON_INTERPRET
LAZY_OK = ("minispin.kernels",)


def module_files() -> dict[str, Path]:
    files = {}
    for package, folder in ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package, *parts])] = path
    return files


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute module an `from ...module import x` inside `importer` names."""
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported minispin module, line, inside a function) for every import statement of a module,
    at any depth (function-level imports included). `from pkg import sub` names the submodule."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, path.name == "__init__.py", node.level, node.module)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known and "." in target:  # import a.b.c -> the module a.b.c or a.b
                target = target.rsplit(".", 1)[0]
            if target in known:
                out.append((target, node.lineno, id(node) in in_function))
    return out


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: {t for t, _, _ in imports_of(name, path, known) if t != name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search, three colours)."""
    colour = {n: 0 for n in graph}  # 0 unvisited, 1 on the stack, 2 done
    for start in sorted(graph):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                colour[node] = 2
            elif colour.get(child, 2) == 1:
                return path[path.index(child):] + [child]
            elif colour.get(child) == 0:
                colour[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_cycle_detector_on_synthetic_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None  # a diamond is no cycle
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": set(), "a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": {"b"}}) == ["b", "c", "d", "b"]


def test_resolver_and_graph_on_a_synthetic_package(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("from .a import f\n")
    (tmp_path / "pkg" / "a.py").write_text("from . import b\n")
    (tmp_path / "pkg" / "b.py").write_text("def g():\n    from .sub.c import h\n")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "c.py").write_text("from ..a import f\n")
    known = {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"}
    assert imports_of("pkg.b", tmp_path / "pkg" / "b.py", known) == [("pkg.sub.c", 2, True)]
    assert imports_of("pkg.sub.c", tmp_path / "pkg" / "sub" / "c.py", known) == [("pkg.a", 1, False)]
    assert imports_of("pkg", tmp_path / "pkg" / "__init__.py", known) == [("pkg.a", 1, False)]
    graph = {n: {t for t, _, _ in imports_of(n, tmp_path / (n.replace(".", "/") + ("/__init__.py" if n in
                                                                                  ("pkg", "pkg.sub") else ".py")),
                                               known)} for n in known}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]  # the function-level import counts


def test_the_real_graph_is_seen():
    graph = import_graph()
    assert "minispin.training.loop" in graph and "minispin.methods.judge" in graph and "minispin.kernels" in graph
    assert "minispin.training.policy" in graph["minispin.training.loop"]
    assert "minispin.methods" in graph["minispin.driver"]
    assert "minispin.distributed" in graph["minispin.training.loop"]  # `from .. import distributed as dist`


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_import_nothing_from_minispin():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("minispin.kernels"):
            bad = {t for t in targets if not t.startswith("minispin.kernels")}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_core_never_imports_the_demo():
    for name, targets in import_graph().items():
        if not name.startswith("minispin.demo"):
            bad = {t for t in targets if t.startswith("minispin.demo")}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_no_function_level_imports_of_our_modules():
    files = module_files()
    found = [f"{files[name].relative_to(REPO)}:{line}: {target}"
             for name in files for target, line, inner in imports_of(name, files[name], set(files))
             if inner and not target.startswith(LAZY_OK)]
    assert not found, "in-function imports of minispin's own modules:\n" + "\n".join(found)


@pytest.mark.parametrize("module", ["minispin.sampler", "minispin.training", "minispin.driver"])
def test_public_functions_and_modules_have_distinct_names(module):
    importlib.import_module(module)
    assert callable(minispin.generate) and callable(minispin.train) and callable(minispin.spin)
    for gone in ("minispin.train", "minispin.spin", "minispin.generate"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(gone)
