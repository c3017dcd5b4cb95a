"""Static checks of the package's shape, read with ``ast`` (nothing is imported).

* The import graph of ``hf_vitmerge`` has no cycle. Every ``import`` statement counts, including
  those inside functions, so a lazy import cannot hide a cycle; importing ``a.b.c`` counts as
  importing the packages ``a.b`` and ``a`` too. The method registry's call-time scan of
  ``methods/`` with ``importlib`` is plugin discovery, not an import statement: instead, no method
  module may reach the orchestration layer (``merging``, ``api``, ``cli``, ``card``) at all.
* No function is over 80 lines, except the offenders listed in ``LONG_FUNCTIONS``. The list can
  only shrink: an entry that is no longer over the limit (or no longer exists) fails too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hf_vitmerge"
MAX_FUNCTION_LINES = 80

# Functions over MAX_FUNCTION_LINES ("module:qualified.name"): none are left; never add one.
LONG_FUNCTIONS: set[str] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    if not is_package:
        parts.pop()
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its body)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, path.name == "__init__.py", node)
                # ``from pkg import sub`` imports the submodule when one exists.
                targets = [
                    f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names
                ]
            else:
                continue
            for t in targets:
                # ``import a.b.c`` runs a, a.b and a.b.c: each package module on the way is an
                # edge, except the packages the importer itself belongs to (already running).
                while t:
                    if t in modules and t != name and not name.startswith(t + "."):
                        edges.add(t)
                    t = t.rpartition(".")[0]
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def function_lengths() -> dict[str, int]:
    """``module:qualname`` -> number of lines (decorators excluded) of every function."""
    out: dict[str, int] = {}

    def walk(node: ast.AST, module: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qual = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out[f"{module}:{qual}"] = child.end_lineno - child.lineno + 1
                walk(child, module, qual + ".")
            else:
                walk(child, module, prefix)

    for name, path in _modules().items():
        walk(ast.parse(path.read_text(), str(path)), name, "")
    return out


def test_checker_sees_a_cycle_and_a_lazy_import():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    # merging imports the methods package at module level; gated imports gate inside a function.
    assert "hf_vitmerge.methods" in graph["hf_vitmerge.merging"]
    assert "hf_vitmerge.gate" in graph["hf_vitmerge.methods.gated"]


def test_import_graph_has_no_cycle():
    assert find_cycles(import_graph()) == []


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# The orchestration layer: it runs methods, so no method may import it, even inside a function.
# (The registry loads the method modules at call time, which the graph above does not see; this
# layering rule is what keeps that call-time loading from closing a cycle.)
ORCHESTRATION = {
    "hf_vitmerge",
    "hf_vitmerge.merging",
    "hf_vitmerge.api",
    "hf_vitmerge.cli",
    "hf_vitmerge.card",
}


def test_methods_never_reach_the_orchestrator():
    graph = import_graph()
    methods = [m for m in graph if m.startswith("hf_vitmerge.methods.")]
    assert "hf_vitmerge.methods.base" in methods and len(methods) > 10
    bad = {m: sorted(_reachable(graph, m) & ORCHESTRATION) for m in methods}
    assert {m: r for m, r in bad.items() if r} == {}


def test_no_new_function_over_80_lines():
    lengths = function_lengths()
    assert lengths, "no functions found: the checker is broken"
    long = {k for k, n in lengths.items() if n > MAX_FUNCTION_LINES}
    added = sorted(long - LONG_FUNCTIONS)
    assert not added, f"functions over {MAX_FUNCTION_LINES} lines: {[(k, lengths[k]) for k in added]}"
    fixed = sorted(LONG_FUNCTIONS - long)
    assert not fixed, f"no longer over {MAX_FUNCTION_LINES} lines: remove {fixed} from LONG_FUNCTIONS"
