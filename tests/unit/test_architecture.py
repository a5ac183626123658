"""The layering rules of docs/architecture.md, checked on the source: no import cycles among the
modules of src/intercloud (TYPE_CHECKING and function-level imports count too), picows only in
transport/ws.py, and the protocol Connection and send_frame only inside tunnel/."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "intercloud"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path, tree: ast.Module, known: set[str]) -> set[str]:
    """Modules of the package ``name`` imports anywhere in its file (a package's own __init__ is left
    out when a submodule of it is named: importing a.b runs a/__init__, but that is not a dependency
    of a/b's author's choosing)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("intercloud"):
                out.add(t)
    # "from . import x" also names the package itself; a submodule does not depend on its __init__
    return {t for t in out if not name.startswith(t + ".")}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {n: _imports(n, p, t, known) for n, (p, t) in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
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


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (TYPE_CHECKING imports count): " + "; ".join(" <-> ".join(c) for c in cycles)


def _offenders(predicate) -> list[str]:
    found = []
    for name, (path, tree) in _modules().items():
        for node in ast.walk(tree):
            hit = predicate(name, node)
            if hit:
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: {hit}")
    return found


def test_only_transport_ws_imports_picows():
    def imports_picows(name, node):
        if name == "intercloud.transport.ws":
            return None
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "picows" for a in node.names):
            return "import picows"
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "picows":
            return f"from {node.module} import ..."
        return None

    assert not _offenders(imports_picows)


def test_only_tunnel_sends_frames_and_touches_the_connection():
    def outside_tunnel(name, node):
        if name.startswith(("intercloud.tunnel", "intercloud.protocol")):
            return None
        if isinstance(node, ast.Attribute) and node.attr in ("send_frame", "conn"):
            return f".{node.attr}"
        if isinstance(node, ast.ImportFrom) and node.module and node.module.endswith("connection") \
                and any(a.name == "Connection" for a in node.names):
            return "imports Connection"
        return None

    found = _offenders(outside_tunnel)
    assert not found, f"{len(found)} places outside tunnel/ build frames or touch Connection:\n" + "\n".join(found)
