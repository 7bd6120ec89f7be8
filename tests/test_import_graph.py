"""No import circles in library/ (issue 16): every `import library...` / `from library... import` of every module,
at module level and inside functions alike (an import moved into a function still ties the two modules together),
makes an edge; each strongly connected component of more than one module is a circle and is named.

A circle is broken by moving the shared piece down (to the lower module or a small new one), never by hiding the
import in a string or importlib.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "library"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name an import statement anywhere in `tree` may load: the module named, and for
    `from X import y` also X.y (a submodule when one exists). Relative imports are resolved against `module`."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def import_graph(root: Path = LIBRARY) -> dict[str, set[str]]:
    """module -> the library modules it imports (itself excluded)."""
    top = root.parent
    files = {module_name(p, top): p for p in sorted(root.rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        deps = imported_names(tree, name, path.name == "__init__.py")
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def _edges_within(graph: dict[str, set[str]], component: list[str]) -> str:
    inside = set(component)
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & inside))}" for m in component)


def test_library_has_no_import_circles():
    graph = import_graph()
    assert len(graph) > 50, "library/ was not found"
    found = cycles(graph)
    assert not found, "import circles in library/ (move the shared piece to the lower module or a new small one):\n" + \
        "\n".join(f"  {' <-> '.join(c)}  ({_edges_within(graph, c)})" for c in found)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "library"


def test_function_level_relative_and_submodule_imports_are_edges(tmp_path):
    lib = _write(tmp_path, {
        "library/__init__.py": "",
        "library/a.py": "def f():\n    from library.b import g\n",
        "library/b.py": "from . import c\n",
        "library/c.py": "import library.a\n",
        "library/pkg/__init__.py": "",
        "library/pkg/x.py": "from .. import a\nfrom library.pkg import y\n",
        "library/pkg/y.py": "import os\n",
    })
    graph = import_graph(lib)
    assert graph == {
        "library": set(), "library.a": {"library.b"}, "library.b": {"library", "library.c"},
        "library.c": {"library.a"}, "library.pkg": set(), "library.pkg.x": {"library", "library.a", "library.pkg",
                                                                               "library.pkg.y"},
        "library.pkg.y": set(),
    }
    assert cycles(graph) == [["library.a", "library.b", "library.c"]]


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"f"}}, [["a", "b"], ["c", "d", "e"]]),
    ({"a": {"b", "c"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_cycles_are_the_strongly_connected_components(graph, expected):
    assert cycles(graph) == expected
