"""Issue 13 part 6: no import cycles between our modules, and no role under workers/ imports
the CLI (``app.cli``): what the API and the roles share lives in app/ (queues, outbox,
dashboard, embedded_redis.resolve).

The graph counts every import statement, also those inside functions (an import deferred into
a function still runs, and hiding a cycle that way is what this test is here to stop).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "workers")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join(here + ([base] if base else []))
                for alias in node.names:  # ``from app import queues`` imports app.queues
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]  # app.engine.X -> app.engine
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v):
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (each line one cycle): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_no_worker_role_imports_the_cli():
    graph = _graph()
    offenders = sorted(
        name for name, deps in graph.items() if name.startswith("workers") and "app.cli" in deps
    )
    assert not offenders, f"these modules under workers/ import app.cli: {offenders}"


def test_the_graph_sees_deferred_imports():
    """The checks above would pass vacuously if the graph missed imports inside functions."""
    graph = _graph()
    assert "workers.worker" in graph["app.cli"]  # ``from workers.worker import run`` in cmd_worker
    assert "app.queues" in graph["workers.worker"]
    assert "app.embedded_redis" in graph["workers.scheduler"]  # inside run()
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
