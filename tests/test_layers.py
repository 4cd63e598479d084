"""The package is layered: floors that import only from the floors below them, no circles, and
every internal import at the top of its file (ARCHITECTURE.md draws the same floors).

Run as a script to print the floors and the import graph read from the source:

    python tests/test_layers.py
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "advbench"

#: bottom to top; a module belongs to the longest name that it is or lies under ("" is the package face)
FLOORS: list[tuple[str, ...]] = [
    ("errors",),
    ("files", "threat", "registry", "params", "tensors", "provenance", "similarity"),
    ("access", "audit", "store", "data", "defenses", "models.layers"),
    ("models", "specs"),
    ("loading",),
    ("attacks", "analysis"),
    ("training",),
    ("zoo",),
    ("config",),
    ("eval",),
    ("blindspots", "curvature", "leaderboard", "report"),
    ("cli", ""),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def floor_of(module: str) -> int | None:
    rel = module.removeprefix("advbench").lstrip(".")
    best: tuple[int, int] | None = None
    for i, names in enumerate(FLOORS):
        for n in names:
            if rel == n or (n and rel.startswith(n + ".")):
                if best is None or len(n) > best[1]:
                    best = (i, len(n))
    return None if best is None else best[0]


def imports(mods: dict[str, Path]) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(every internal import edge, the edges made inside a function or class body)."""

    def resolve(target: str) -> str | None:
        parts = target.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in mods:
                return ".".join(parts[:i])
        return None

    edges, nested = set(), set()
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for stmt in tree.body if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.If, ast.Try))
               for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    mod = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
                targets = [resolve(f"{mod}.{a.name}") or resolve(mod) for a in node.names] if mod.startswith("advbench") else []
            elif isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names if a.name.startswith("advbench")]
            else:
                continue
            for t in {t for t in targets if t and t != name}:
                edges.add((name, t))
                if id(node) not in top:
                    nested.add((name, t))
    return edges, nested


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_floor():
    assert [m for m in modules() if floor_of(m) is None] == []


def test_no_import_runs_up_a_floor():
    mods = modules()
    edges, _ = imports(mods)
    upward = sorted((a, b) for a, b in edges if floor_of(b) > floor_of(a))  # type: ignore[operator]
    assert upward == []


def test_no_circles():
    assert cycles(imports(modules())[0]) == []


def test_internal_imports_sit_at_the_top_of_their_files():
    assert sorted(imports(modules())[1]) == []


def main() -> None:
    mods = modules()
    edges, _ = imports(mods)
    by_floor: dict[int, list[str]] = defaultdict(list)
    for m in mods:
        by_floor[floor_of(m)].append(m)  # type: ignore[index]
    for i in sorted(by_floor, reverse=True):
        print(f"floor {i:2d}: {', '.join(sorted(m.removeprefix('advbench.') for m in by_floor[i]))}")
    print(f"\n{len(mods)} modules, {len(edges)} internal imports, "
          f"{sum(floor_of(b) > floor_of(a) for a, b in edges)} upward, {len(cycles(edges))} circles")  # type: ignore[operator]
    if "--edges" in sys.argv:
        for a, b in sorted(edges):
            print(f"{a} -> {b}")


if __name__ == "__main__":
    main()
