"""The import graph of the project's own modules: no circle, and no deployable importing another.

Read with the standard library's `ast`, never by importing: a module-level import and one inside a function
(or under `if TYPE_CHECKING:`) are both edges: a lazy import hides a circle from the interpreter, not from
the reader, and the two modules still cannot be understood or moved one without the other.
`grape/cli.py` hands over to the deployables by "module:function" strings through importlib; strings are
not imports, so that is allowed.

Importing `a.b.c` also runs `a/__init__` and `a/b/__init__`; those implicit edges are left out (a package
whose `__init__` registers its own submodules would otherwise always be a circle with them).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = "grape"
DEPLOYABLES = ("service", "workers", "trainer", "evaluator")

Graph = Mapping[str, set[str]]


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the given top-level packages."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imported_names(tree: ast.AST, module: str, is_package: bool, modules: Mapping[str, Path]) -> Iterable[str]:
    """Every dotted name an import statement anywhere in the tree loads, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                # `from pkg import name` is an import of the submodule pkg.name when there is one
                submodule = f"{target}.{alias.name}"
                yield submodule if submodule in modules else target


def _owner(name: str, modules: Mapping[str, Path]) -> str | None:
    """The project module a dotted name lives in (`grape.keys.Keys` -> `grape.keys`), or None if external."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (itself excluded)."""
    modules = module_files(root, packages)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        names = _imported_names(tree, module, path.name == "__init__.py", modules)
        targets = {_owner(name, modules) for name in names}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """One concrete circle (first node repeated at the end) per strongly connected component with more than
    one module, found with Tarjan's algorithm (iterative: no recursion limit on deep graphs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return [_circle_through(component, graph) for component in sorted(components)]


def _circle_through(component: list[str], graph: Graph) -> list[str]:
    """A shortest path inside the component from its first module back to itself (breadth first)."""
    members = set(component)
    start = component[0]
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no circle through {start} in {component}")  # Tarjan never yields that


def crossings(graph: Graph) -> list[str]:
    """Imports that break the layering: a deployable importing another deployable, or the shared package
    importing any deployable."""
    found = []
    for source, targets in sorted(graph.items()):
        top = source.split(".")[0]
        allowed = {SHARED} if top == SHARED else {SHARED, top}
        found += [f"{source} -> {t}" for t in sorted(targets) if t.split(".")[0] not in allowed]
    return found


# ---- the finder itself can fail -------------------------------------------------------------------------


def test_cycle_finder_reports_a_circle_and_nothing_on_a_tree() -> None:
    circle = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}}
    assert find_cycles(circle) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    two = {"a": {"b"}, "b": {"a"}, "x": {"y"}, "y": {"z"}, "z": {"x"}}
    assert find_cycles(two) == [["a", "b", "a"], ["x", "y", "z", "x"]]


def test_graph_sees_relative_and_function_level_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n    return b\n")
    (pkg / "sub" / "b.py").write_text("from ..a import f\nimport os\n")
    (pkg / "sub" / "c.py").write_text("from . import b\nfrom pkg.a import f as g\n")
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.a"}
    assert graph["pkg.sub.c"] == {"pkg.sub.b", "pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.a"]]


def test_crossings_finds_a_deployable_importing_another() -> None:
    graph = {"service.app": {"grape.keys", "service.deps", "workers.loop"}, "grape.cli": {"trainer.main"}}
    assert crossings(graph) == ["grape.cli -> trainer.main", "service.app -> workers.loop"]


# ---- the project -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project_graph() -> dict[str, set[str]]:
    graph = import_graph(ROOT, (SHARED, *DEPLOYABLES))
    assert {"grape.keys", "service.app", "workers.loop", "trainer.loop", "evaluator.loop"} <= graph.keys()
    return graph


def test_no_import_circle(project_graph: dict[str, set[str]]) -> None:
    cycles = find_cycles(project_graph)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_deployable_imports_another(project_graph: dict[str, set[str]]) -> None:
    found = crossings(project_graph)
    assert not found, "imports across deployables (share code through grape/ instead):\n" + "\n".join(found)
