"""The package's layers, read from the source with ``ast``: imports run one way, with no circles.

    protocol/, fl/                     pure core: stdlib, numpy, fedfs.errors and each other
    store/, trust/, weights/, nnunet/  I/O edges: the core and each other
    roles/                             the core and the edges (never the facade, ops/ or cli/)
    federation                         the facade: everything below it
    ops/                               library shells: never click, never cli/
    cli/                               thin click commands over ops/ and roles/
    testing/                           test support: anything

Every import counts, also one inside a function or under ``TYPE_CHECKING``: a lazy import
is still a dependency. A circle is any cycle in the module graph.
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "fedfs"

LAYER_OF_PACKAGE = {
    "protocol": "core", "fl": "core",
    "store": "edge", "trust": "edge", "weights": "edge", "nnunet": "edge", "privacy": "edge",
    "roles": "roles", "federation": "facade", "ops": "ops", "cli": "cli", "testing": "testing",
    "errors": "base", "__init__": "top", "__main__": "cli",
}
#: Which layers each layer may import (besides itself and fedfs.errors).
MAY_IMPORT = {
    "base": set(),
    "core": {"core"},
    "edge": {"core", "edge"},
    "roles": {"core", "edge"},
    "facade": {"core", "edge", "roles"},
    "ops": {"core", "edge", "roles", "facade", "testing"},
    "cli": {"core", "edge", "roles", "facade", "ops", "testing"},
    "testing": {"core", "edge", "roles", "facade", "ops"},
    "top": {"base"},  # fedfs/__init__ re-exports lazily, by name, never by import
}
PURE_THIRD_PARTY = {"numpy"}
STDLIB = set(sys.stdlib_module_names)


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path, known: set[str]) -> list[tuple[str, int]]:
    """Every module ``path`` imports, absolute, with its line: (``fedfs.x.y`` or third-party top name)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
            for a in node.names:  # `from pkg import submodule` imports the submodule
                if f"{mod}.{a.name}" in known:
                    out.append((f"{mod}.{a.name}", node.lineno))
    return out


def layer(mod: str) -> str:
    parts = mod.split(".")
    return LAYER_OF_PACKAGE.get(parts[1] if len(parts) > 1 else "__init__", "?")


def check_tree(root: Path) -> list[str]:
    """Every layering problem in the package at ``root``, one line each (empty when clean)."""
    files = sorted(root.rglob("*.py"))
    known = {module_name(p, root) for p in files}
    graph: dict[str, set[str]] = {}
    problems = []
    for path in files:
        mod = module_name(path, root)
        mine = layer(mod)
        if mine == "?":
            problems.append(f"{mod}: in no layer (add its package to LAYER_OF_PACKAGE)")
        graph[mod] = set()
        for target, line in imports_of(path, root, known):
            where = f"{path.relative_to(root.parent)}:{line}"
            top = target.split(".")[0]
            if top == "fedfs":
                if target == "fedfs":
                    continue
                if target not in known:
                    problems.append(f"{where}: imports {target}, which does not exist")
                    continue
                if target != mod:
                    graph[mod].add(target)
                theirs = layer(target)
                if theirs != mine and theirs != "base" and theirs not in MAY_IMPORT.get(mine, set()):
                    problems.append(f"{where}: {mine} module {mod} imports {theirs} module {target} (upward)")
            elif mine in ("core", "base") and top not in STDLIB and top not in PURE_THIRD_PARTY:
                problems.append(f"{where}: pure module {mod} imports {top}")
            elif top == "nnunetv2" and not mod.startswith("fedfs.nnunet"):
                problems.append(f"{where}: {mod} imports nnunetv2 (only fedfs.nnunet may)")
            elif top == "click" and mine != "cli":
                problems.append(f"{where}: {mod} imports click (only fedfs.cli may)")
    problems += [f"import circle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(_shortest_cycle(graph, set(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _shortest_cycle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest import path from the component's first module back to itself."""
    start = min(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    return paths[v] + [start]
                if w in comp and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return sorted(comp) + [start]


def test_the_package_is_layered():
    assert check_tree(ROOT) == []


@pytest.fixture
def copy(tmp_path):
    dst = tmp_path / "fedfs"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_an_upward_import_is_caught(copy):
    # Prepare: the pure round logic reaching up into a role
    p = copy / "protocol" / "rounds.py"
    p.write_text(p.read_text() + "\nfrom ..roles import site  # noqa\n")
    # Execute / Assert
    problems = check_tree(copy)
    assert any("core module fedfs.protocol.rounds imports roles module fedfs.roles.site" in x for x in problems), problems


def test_a_circle_is_caught(copy):
    p = copy / "store" / "base.py"
    p.write_text(p.read_text() + "\ndef _later():\n    from ..trust import bucket  # noqa\n")
    problems = check_tree(copy)
    assert any(x.startswith("import circle:") and "fedfs.store.base" in x and "fedfs.trust.bucket" in x
               for x in problems), problems


def test_click_and_torch_stay_out_of_the_core(copy):
    p = copy / "fl" / "align.py"
    p.write_text(p.read_text() + "\nimport torch  # noqa\n")
    q = copy / "ops" / "status.py"
    q.write_text(q.read_text() + "\nimport click  # noqa\n")
    problems = check_tree(copy)
    assert any("pure module fedfs.fl.align imports torch" in x for x in problems), problems
    assert any("fedfs.ops.status imports click" in x for x in problems), problems
