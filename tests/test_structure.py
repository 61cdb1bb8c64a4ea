"""The architecture as a test (docs/DESIGN.md §5): dependencies point one way, and no import circle exists,
lazy (function-level) imports included.

The import graph is read from the source with ``ast``: every ``import``/``from ... import`` of a
module of ``eoc_dit`` or ``eoc_kernels``, wherever it appears in the file.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"eoc_kernels": os.path.join(ROOT, "eoc_kernels"), "eoc_dit": os.path.join(ROOT, "python", "eoc_dit")}


def _modules():
    """{dotted module name: path} of every module of both packages."""
    found = {}
    for package, folder in PACKAGES.items():
        for dirpath, _, files in os.walk(folder):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), folder)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join([package, *rel])] = os.path.join(dirpath, name)
    return found


def _imports(module: str, path: str, known: set) -> set:
    """The project modules ``module`` imports (a package import counts as its __init__)."""
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import mod` imports the module; `from pkg import name` needs pkg itself.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # eoc_dit.prior.Prior -> eoc_dit.prior
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {module: _imports(module, path, set(modules)) for module, path in modules.items()}


def test_the_kernels_never_import_the_integration(graph):
    offenders = {m: sorted(t for t in targets if t.startswith("eoc_dit"))
                 for m, targets in graph.items() if m.startswith("eoc_kernels")}
    assert not any(offenders.values()), offenders


def test_no_import_circle(graph):
    # Package __init__ files re-export their modules: an edge from a module up to its own package's
    # __init__ would close a trivial loop, so those edges are checked to be absent too.
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_graph_was_read(graph):
    # The checks above can fail: the graph holds the edges the design names.
    assert "eoc_dit.planner" in graph["eoc_dit.patching"] and "eoc_dit.feature_cache" in graph["eoc_dit.patching"]
    assert "eoc_dit.patching" in graph["eoc_dit.fitting"] and "eoc_dit.patching" in graph["eoc_dit.calibration"]
    assert "eoc_dit.patching" not in graph["eoc_dit.prior"] and "eoc_kernels" in graph["eoc_dit.patching"]
