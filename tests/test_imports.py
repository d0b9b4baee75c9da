"""The package's layering: no import cycles between houndd's parts, the puller never imports
the coordinator, and the coordinator reaches the puller only through its LocalExecutor
protocol (the daemon adapts one to the other)."""

from __future__ import annotations

import ast
from pathlib import Path

import houndd

ROOT = Path(houndd.__file__).parent


def _unit(module: str) -> str:
    """houndd.coordinator.plan.model -> houndd.coordinator; houndd.daemon -> houndd.daemon."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    module = _module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
    return {m for m in found if m == "houndd" or m.startswith("houndd.")}


def unit_graph() -> dict[str, set[str]]:
    """Part of houndd -> the parts it imports (subpackages and top-level modules)."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        unit = _unit(_module_of(path))
        deps = {_unit(m) for m in _imports(path)} - {unit, "houndd"}
        graph.setdefault(unit, set()).update(deps)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph`, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_between_the_parts_of_houndd() -> None:
    graph = unit_graph()
    assert {"houndd.wire", "houndd.membership", "houndd.coordinator", "houndd.puller"} <= set(graph)
    assert find_cycle(graph) is None, find_cycle(graph)


def test_the_puller_and_the_coordinator_do_not_import_each_other() -> None:
    graph = unit_graph()
    assert "houndd.coordinator" not in graph["houndd.puller"]
    assert "houndd.puller" not in graph["houndd.coordinator"]
    # The wire layer, which every part imports, imports none of them.
    assert graph["houndd.wire"] <= {"houndd.errors", "houndd.keyfiles", "houndd.names"}


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
