"""The package's layout rules, checked on its source: no import cycles (function-level
imports included), no module importing another module's underscore names, no module
over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "speedq_mlx"
MAX_LINES = 400


def modules(package: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (packages by their __init__)."""
    out = {}
    for f in sorted(package.rglob("*.py")):
        parts = f.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(name: str, path: Path, known: dict) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) of every import in the module, anywhere."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + is_pkg]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, None) if sub in known else (target, a.name))
    root = next(iter(known)).split(".")[0]
    return [(m, n) for m, n in out if m == root or m.startswith(root + ".")]


def cycles(graph: dict[str, set]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def problems(package: Path, max_lines: int = MAX_LINES) -> list[str]:
    known = modules(package)
    graph, found = {}, []
    for name, path in known.items():
        for target, imported in imports(name, path, known):
            if target != name and target in known:
                graph.setdefault(name, set()).add(target)
            if imported and imported.startswith("_") and not imported.startswith("__") and target != name:
                found.append(f"{name} imports the private name {target}.{imported}")
        n = len(path.read_text().splitlines())
        if n > max_lines:
            found.append(f"{name}: {n} lines (> {max_lines})")
    found += [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    return found


def test_the_package_keeps_its_layout_rules():
    assert problems(PACKAGE) == []


def _write(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "pkg"


@pytest.mark.parametrize("files, expected", [
    ({"pkg/__init__.py": "", "pkg/a.py": "def f():\n    from .b import g\n",
      "pkg/sub/__init__.py": "", "pkg/b.py": "from . import a\n"},
     ["import cycle: pkg.a <-> pkg.b"]),
    ({"pkg/__init__.py": "", "pkg/a.py": "_x = 1\n", "pkg/sub/__init__.py": "",
      "pkg/sub/c.py": "from ..a import _x\n"},
     ["pkg.sub.c imports the private name pkg.a._x"]),
    ({"pkg/__init__.py": "", "pkg/long.py": "x = 1\n" * 401},
     ["pkg.long: 401 lines (> 400)"]),
])
def test_the_check_finds_what_it_forbids(tmp_path, files, expected):
    """A function-level import closing a cycle, a private cross-import across packages, a
    long module: each is reported."""
    assert problems(_write(tmp_path, files)) == expected
