"""The package's module-level import graph has no cycle.

An import that runs when a module is imported (at module level, in a module-level ``try``/``if``,
or in a class body) is an edge; an import inside a function body (a lazy import) is not. A cycle
means two modules each need the other half-built, which breaks as soon as either changes.
"""
import ast
import os

import npgpt

ROOT = os.path.dirname(npgpt.__file__)


def _modules():
    mods = {}
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                mods[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return mods


def _import_time_nodes(tree):
    """Import nodes executed at import time: everything but the bodies of functions."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def _targets(mods, module, node):
    package = module if mods[module].endswith("__init__.py") else module.rsplit(".", 1)[0]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1])
        target = base + ("." + node.module if node.module else "")
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def import_graph():
    mods = _modules()
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in _import_time_nodes(tree):
            for t in _targets(mods, m, node):
                # importing a submodule runs its package's __init__ first, which is not a cycle
                if t in mods and t != m and not m.startswith(t + "."):
                    edges[m].add(t)
    return edges


def find_cycles(edges):
    state, stack, cycles = {}, [], []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycles():
    edges = import_graph()
    assert len(edges) > 30 and sum(map(len, edges.values())) > 50    # the walk found the package
    cycles = find_cycles(edges)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
