"""The import graph of the project's packages, read from the source with ``ast``.

Every ``import`` and ``from ... import`` counts, at module level or inside a
function: a function-level import only delays a circle, it does not remove it.
"""

from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pipelines", "transforms")


def modules(packages=PACKAGES, root=REPO) -> dict[str, str]:
    """Dotted module name → source path, for every ``.py`` file of ``packages`` (``__init__`` as the package)."""
    found = {}
    for package in packages:
        for folder, _, files in os.walk(os.path.join(root, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, root)[:-len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


def imported_names(path: str, module: str, is_package: bool) -> list[tuple[str, int]]:
    """Every module name ``path`` imports (absolute, dotted), with its line; ``from a import b`` gives ``a.b`` and ``a``."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), filename=path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.append((base, node.lineno))
            names += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return names


def graph(packages=PACKAGES, root=REPO) -> dict[str, dict[str, int]]:
    """Module → {imported project module: first line}, project modules only."""
    known = modules(packages, root)
    edges = {}
    for module, path in known.items():
        targets = {}
        for name, line in imported_names(path, module, path.endswith("__init__.py")):
            if name in known and name != module:
                targets.setdefault(name, line)
        edges[module] = targets
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """One circle (a list of modules, first repeated last) per strongly connected group of more than one module."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):  # Tarjan's algorithm; the graph is a few dozen modules, recursion is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [_circle(edges, group) for group in groups]


def _circle(edges, group: list[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start, members = group[0], set(group)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for target in sorted(edges[path[-1]]):
            if target == start:
                return path + [start]
            if target in members and target not in seen:
                seen.add(target)
                paths.append(path + [target])
    return group
