"""The two floors, checked statically over every import (module level and inside functions).

Layers, top to bottom: rag (the face: CLI, commands, studies, swap harness, demo, repro) -> readers ->
retrievers -> {eval, index} -> core (the ground). A module imports only its own package or lower
layers; eval and index do not import each other; only the face imports argparse; no import cycle
between modules. The parser here is independent of the import machinery: it reads the source.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "index": 1, "eval": 1, "retrievers": 2, "readers": 3, "rag": 4}
FACE = "rag"


def _modules() -> dict[str, Path]:
    mods = {}
    for top in LAYERS:
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported dotted name, line) for every import statement in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((module, node.lineno))
            out += [(f"{module}.{a.name}", node.lineno) for a in node.names]
    return out


def _graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], int], dict[str, list[int]]]:
    mods = _modules()

    def resolve(dotted: str) -> str | None:
        while dotted:
            if dotted in mods:
                return dotted
            dotted = dotted.rpartition(".")[0]
        return None

    edges: dict[str, set[str]] = defaultdict(set)
    lines: dict[tuple[str, str], int] = {}
    argparse_users: dict[str, list[int]] = defaultdict(list)
    for name, path in mods.items():
        for dotted, line in _imports(name, path):
            if dotted.split(".")[0] == "argparse":
                argparse_users[name].append(line)
            target = resolve(dotted)
            if target and target != name:
                edges[name].add(target)
                lines.setdefault((name, target), line)
    for name in mods:
        edges.setdefault(name, set())
    return edges, lines, argparse_users


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_checker_sees_a_cycle_and_a_back_arrow():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    imports = dict(_imports("rag.commands.index", ROOT / "rag" / "commands" / "index.py"))
    assert "argparse" in imports and "retrievers.index_kinds" in imports


def test_no_import_cycles_between_modules():
    edges, lines, _ = _graph()
    cycles = _cycles(edges)
    detail = [" -> ".join(c) for c in cycles]
    assert not cycles, f"import cycles: {detail}"


def test_imports_only_go_down_the_layers():
    edges, lines, _ = _graph()
    bad = []
    for source, targets in edges.items():
        top = source.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other == top:
                continue
            if LAYERS[other] >= LAYERS[top]:
                bad.append(f"{source}:{lines[(source, target)]} imports {target}")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def test_only_the_face_imports_argparse():
    _, _, users = _graph()
    bad = [f"{m}:{lines}" for m, lines in users.items() if m.split(".")[0] != FACE]
    assert not bad, f"argparse outside the face: {bad}"


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_every_package_folder_is_a_regular_package(package):
    folders = {p.parent for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts}
    missing = [str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists()]
    assert not missing, f"folders without __init__.py: {missing}"
