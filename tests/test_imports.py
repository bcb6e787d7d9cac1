"""No import cycles inside `dp_diffusion` (issue 13, item 7).

The graph is read from the source (AST), not by importing: an edge A -> B for every `import` of B in module A.
Module-level imports must form no cycle, between modules or between the package's parts (`config`,
`methods`, `data`, ...). Imports inside a function may close a cycle only where `ALLOWED_LAZY` lists them,
each with the reason; an entry that no longer closes a cycle fails too, so the list only shrinks.
Imports under `if TYPE_CHECKING:` never run and are left out; so are the implicit imports of a module's
parent packages.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "dp_diffusion"
ROOT = Path(__file__).resolve().parent.parent

# (importer, imported): function-local imports that close a cycle, and why they are still there.
ALLOWED_LAZY: dict[tuple[str, str], str] = {
    ("dp_diffusion.privacy.self_check", "dp_diffusion.cli"):
        "privacy/self_check.measure (a timing helper) reads CONF_DIR from the CLI module; CONF_DIR belongs in "
        "a module below both",
    ("dp_diffusion.privacy.self_check", "dp_diffusion.privacy"):
        "privacy/self_check.measure builds the privacy core from the package that imports self_check",
}


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its __init__.py)."""
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported (also inside if/try/with at module level)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _module_level(block)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)


def _type_checking_imports(tree: ast.Module) -> set[int]:
    return {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for stmt in node.body for n in ast.walk(stmt)}


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `node` imports, each as the most specific module that exists."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    found = set()
    for name in names:
        if name.split(".")[0] != PACKAGE:
            continue
        while name not in modules:
            name = name.rsplit(".", 1)[0]
        if name != module:
            found.add(name)
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, function-local edges not already module-level) of every module."""
    modules = module_files()
    eager: dict[str, set[str]] = {}
    lazy: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        top = list(_module_level(tree.body))
        skip = {id(n) for n in top} | _type_checking_imports(tree)
        eager[module] = set().union(*(_targets(n, module, is_package, modules) for n in top))
        inner = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skip]
        lazy[module] = set().union(*(_targets(n, module, is_package, modules) for n in inner)) - eager[module]
    return eager, lazy


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
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


def part(module: str) -> str:
    """The package's part a module belongs to: `dp_diffusion.config`, `dp_diffusion.methods`, ..."""
    return ".".join(module.split(".")[:2])


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    return import_graph()


def test_cycle_finder_finds_a_cycle_and_nothing_else():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_graph_sees_the_imports(graph):
    eager, lazy = graph
    assert "dp_diffusion.data.registry" in eager["dp_diffusion.data.datamodule"]
    assert "dp_diffusion.config" in eager["dp_diffusion.run_config"]
    assert "dp_diffusion.train" in lazy["dp_diffusion.cli"]  # `dp-diffusion train` imports it when it runs


def test_no_cycle_among_module_level_imports(graph):
    eager, _ = graph
    assert cycles(eager) == []


def test_config_checks_import_nothing_of_the_package(graph):
    """data, privacy and methods all raise ConfigError: dp_diffusion.config must sit below them."""
    eager, _ = graph
    assert eager["dp_diffusion.config"] == set()


def test_no_cycle_between_the_parts_of_the_package(graph):
    eager, _ = graph
    parts: dict[str, set[str]] = {}
    for module, targets in eager.items():
        parts.setdefault(part(module), set()).update(part(t) for t in targets if part(t) != part(module))
    parts.pop(PACKAGE, None)  # dp_diffusion/__init__.py
    for targets in parts.values():
        targets.discard(PACKAGE)
    assert cycles(parts) == []  # e.g. config -> methods -> config


def allowed_graph(eager: dict[str, set[str]], lazy: dict[str, set[str]]) -> dict[str, set[str]]:
    """Every import, module-level or in a function, but the `ALLOWED_LAZY` ones."""
    return {m: eager[m] | {t for t in lazy[m] if (m, t) not in ALLOWED_LAZY} for m in eager}


def test_function_local_imports_close_no_cycle_but_the_listed_ones(graph):
    assert cycles(allowed_graph(*graph)) == []


@pytest.mark.parametrize("edge", sorted(ALLOWED_LAZY), ids=lambda e: f"{e[0]}->{e[1]}")
def test_each_allowed_lazy_import_is_still_needed(graph, edge):
    importer, imported = edge
    full = allowed_graph(*graph)
    assert imported in graph[1].get(importer, set()), f"{importer} no longer imports {imported}: drop the entry"
    reached, todo = {imported}, [imported]
    while todo:
        for nxt in full.get(todo.pop(), ()):
            if nxt not in reached:
                reached.add(nxt)
                todo.append(nxt)
    assert importer in reached, f"{importer} -> {imported} closes no cycle any more: drop the entry"
