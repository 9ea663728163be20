"""The package's imports form no cycle, and only optional dependencies are imported late.

Read from the source (``ast``), as a reader of the code sees it: module-level imports are
edges (those under ``if TYPE_CHECKING:`` aside: they never run); ``from . import x`` is an
edge to the submodule ``x``. A cycle means a module can only be understood, and imported,
together with the others in it; an import inside a function hides a dependency from the
module's head, which is acceptable only for what a user may not have installed.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ipfs_accelerate_py"
#: third-party packages a user may not have: imported where they are used
OPTIONAL = {"opentelemetry", "uvloop", "certifi", "prometheus_client", "tokenizers",
            "transformers", "torch", "matplotlib", "ray", "pyarrow", "pandas"}


def _modules() -> Dict[str, Path]:
    mods: Dict[str, Path] = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mods[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _targets(mods: Dict[str, Path], module: str, node: ast.AST) -> List[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".")
        if not mods[module].name == "__init__.py":
            base = base[:-1]
        base = base[:len(base) - (node.level - 1)]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    subs = [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in mods]
    return subs + ([name] if len(subs) < len(node.names) else [])


def _scan() -> Tuple[Dict[str, Set[str]], List[Tuple[str, str]]]:
    """(module -> the package modules it imports at its top level, [(module, late import)])."""
    mods = _modules()
    edges: Dict[str, Set[str]] = defaultdict(set)
    late: List[Tuple[str, str]] = []

    def visit(module: str, node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                targets = _targets(mods, module, child)
                if inner:
                    late.extend((module, t) for t in targets)
                else:
                    edges[module].update(t for t in targets if t in mods and t != module)
            visit(module, child, inner)

    for module, path in mods.items():
        visit(module, ast.parse(path.read_text()), False)
    return edges, late


def _cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in list(edges):
        if v not in index:
            connect(v)
    return out


def test_the_package_has_no_import_cycle() -> None:
    edges, _ = _scan()
    assert sum(len(v) for v in edges.values()) > 100  # the scan sees the package's imports
    assert _cycles(edges) == []


def test_imports_inside_functions_are_only_of_optional_dependencies() -> None:
    _, late = _scan()
    assert [(m, t) for m, t in late if t.split(".")[0] not in OPTIONAL] == []


def test_the_scan_would_see_a_cycle() -> None:
    """The check can fail: two modules importing each other are one group."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
