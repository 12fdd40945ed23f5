"""The layout's rules, read off the source: dependencies point one way, no module imports
another at import time in a cycle, nobody imports another module's private names, no
module of the library grows past 500 lines."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500


def _modules():
    """{dotted name: path} of every module of minicnn and optim (a package is its __init__)."""
    found = {}
    for package in ("minicnn", "optim"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _ancestors(name):
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _imports(name, path):
    """[(imported module, the names taken from it)] of the imports that run when `name` is
    imported: those at module level, not those inside a function or a class."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.parse(path.read_text()).body:  # module level only
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [alias.name for alias in node.names]
            found.append((base, names))
            found += [(f"{base}.{n}", []) for n in names if f"{base}.{n}" in MODULES]  # submodules
    return [(target, names) for target, names in found if target in MODULES]


def _graph():
    """Edges of import-time execution: importing `a.b.c` also runs the packages above it, but
    not those the importer sits in (they are being imported already)."""
    graph = {}
    for name, path in MODULES.items():
        targets = set()
        for target, _ in _imports(name, path):
            targets |= ({target} | _ancestors(target)) - _ancestors(name)
        graph[name] = targets - {name}
    return graph


def test_importing_minicnn_does_not_import_optim():
    code = "import minicnn, sys; print([m for m in sys.modules if m.split('.')[0] == 'optim'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_dependencies_point_one_way():
    """minicnn never imports optim at import time; no library module imports the application."""
    for name, targets in _graph().items():
        if name.startswith("minicnn"):
            assert not [t for t in targets if t.startswith("optim")], f"{name} imports optim"
        if not name.startswith("optim.app"):
            assert not [t for t in targets if t.startswith("optim.app")], f"{name} imports the application"


def test_no_import_cycle():
    graph, state, path = _graph(), {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_module_imports_private_names_of_another():
    for name, path in MODULES.items():
        for target, names in _imports(name, path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{name} imports {private} from {target}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_short(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name}: {lines} lines"


def test_each_package_declares_its_public_api():
    for name, path in MODULES.items():
        if path.name == "__init__.py":
            tree = ast.parse(path.read_text())
            assert ast.get_docstring(tree), f"{name}: no docstring saying what lives where"
            assert any(isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets)
                       for node in tree.body), f"{name}: no __all__"
