"""The package's layers, kept by a test: no import cycle, pytest only in the plugin, engine below.

The import graph is built from the source (every ``import`` counts: at module level, inside
functions and under ``TYPE_CHECKING``), so a cycle cannot hide behind a function-local import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "harness"
#: Reading, streaming, the delta registry, the oracle and the merger: the engine.
ENGINE = (
    "harness.io",
    "harness.stream",
    "harness.deltas",
    "harness.oracle",
    "harness.merger",
    "harness.export",
)
#: What the engine must never import.
ABOVE_ENGINE = ("harness.checks", "harness.run", "harness.gate", "harness.plugin")


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module ``path`` imports (absolute, resolved), harness-internal or not."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in known else base)
    return found


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """harness module -> the harness modules it imports."""
    found = modules(root)
    known = set(found)
    return {
        name: {m for m in imports(path, name, known) if m in known and m != name}
        for name, path in found.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_a_cycle_is_found(tmp_path):
    """The detector itself: two modules importing each other inside functions are a cycle."""
    package = tmp_path / "harness"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from harness import b\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from harness.a import f\n")
    assert cycles(graph(package)) == [["harness.a", "harness.b"]]


def test_only_the_plugin_imports_pytest():
    offenders = sorted(
        name
        for name, path in modules().items()
        if not name.startswith("harness.plugin")
        and any(m == "pytest" or m.startswith(("pytest.", "_pytest"))
                for m in imports(path, name, set(modules())))
    )
    assert offenders == []


def test_nothing_below_the_plugin_imports_it():
    edges = graph()
    offenders = sorted(
        f"{name} -> {target}"
        for name, targets in edges.items()
        if not name.startswith("harness.plugin")
        for target in targets
        if target.startswith("harness.plugin")
    )
    assert offenders == []


@pytest.mark.parametrize("layer", ENGINE)
def test_engine_imports_nothing_above_it(layer):
    edges = graph()
    offenders = sorted(
        f"{name} -> {target}"
        for name, targets in edges.items()
        if name == layer or name.startswith(layer + ".")
        for target in targets
        if target.startswith(ABOVE_ENGINE)
    )
    assert offenders == []


def test_modules_stay_small():
    """No module of the package grows past about 500 lines (one idea each)."""
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 520}
    assert long == {}
