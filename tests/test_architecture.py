"""The structure DESIGN.md asks for, read off the source: imports flow one way.

The import graph of ``src/fedhet`` (module → the fedhet modules it imports at
run time; imports under ``if TYPE_CHECKING:`` are type-only and left out, as
are the implicit imports of parent packages) has no cycle; no module imports
another module's ``_private`` name; strategies import nothing of the runtimes;
no file is longer than 500 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MODULES = {
    ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): path
    for path in sorted((SRC / "fedhet").rglob("*.py"))
}


def _runtime_imports(tree: ast.Module) -> list[ast.ImportFrom | ast.Import]:
    """Import statements outside ``if TYPE_CHECKING:`` blocks."""
    found: list[ast.ImportFrom | ast.Import] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            for child in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, child, []) or [])

    visit(tree.body)
    return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module → imported fedhet modules; and every import of a private name."""
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    private: list[str] = []
    for name, path in MODULES.items():
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges[name] |= {a.name for a in node.names if a.name in MODULES}
                continue
            if not (node.module or "").startswith("fedhet"):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                edges[name].add(sub if sub in MODULES else node.module)
                if alias.name.startswith("_") and sub not in MODULES:
                    private.append(f"{name} imports {node.module}.{alias.name}")
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_the_import_graph_has_no_cycle_and_no_private_import():
    edges, private = _graph()
    assert "fedhet.runtime.driver" in edges and edges["fedhet.runtime.sim"]  # the graph was read
    assert _cycles(edges) == []
    assert private == []


def test_a_cycle_is_found_when_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_strategies_and_clients_know_nothing_of_the_runtimes():
    edges, _ = _graph()
    for name, targets in edges.items():
        if name.startswith(("fedhet.strategies", "fedhet.client", "fedhet.protocol")):
            assert not {t for t in targets if t.startswith("fedhet.runtime")}, name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_source_file_is_longer_than_500_lines(name):
    assert len(MODULES[name].read_text().splitlines()) <= 500
