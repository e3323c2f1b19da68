"""The layers of the package, read from its source: every import (at the top of a file or inside a function)
points down or sideways, never up; no two modules import each other, directly or through others; nothing inside
imports the package face; and imports stand at the top of each file, save the lazy ones named below."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ropescope"

# Lowest first: a module may import from its own layer and the layers below it. docs/architecture.md draws this.
LAYERS = (
    ("errors", "statistics"),
    ("rope",),
    ("io",),
    ("model",),
    ("tasks",),
    ("eval", "attention"),
    ("train",),
    ("study",),
    ("commands",),
    ("cli", "__main__"),
)
RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}
# Imports a function may make: a heavy optional dependency, kept out of every process that does not use it.
LAZY = ("ray", "llama_cpp")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) of every import of ropescope or a third-party package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(name, node.lineno, node.col_offset > 0) for name in names]
    return found


def internal_edges() -> dict[str, set[str]]:
    """module -> the ropescope modules it imports (a `from package import module` counts as the module)."""
    known = modules()
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for imported, _, _ in imports(path):
            if imported in known and imported != name and not (imported == "ropescope"):
                edges[name].add(imported)
            elif imported == "ropescope" and name != "ropescope":
                edges[name].add("ropescope")
    # `from ropescope.x import y` where y is a name, not a module, leaves ropescope.x, already added
    return edges


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_room_has_a_layer():
    rooms = {room(name) for name in modules()} - {""}
    assert rooms <= set(RANK), f"rooms without a layer: {sorted(rooms - set(RANK))}"


def test_no_module_imports_the_package_face():
    # the face (ropescope/__init__.py) imports from every layer: importing it from inside pulls them all in
    offenders = [name for name, targets in internal_edges().items() if "ropescope" in targets and name != "ropescope"]
    assert not offenders, f"import the defining module instead of `ropescope`: {offenders}"


def test_imports_point_down():
    upward = [
        f"{name} -> {target}"
        for name, targets in internal_edges().items() if name != "ropescope"
        for target in targets if target != "ropescope" and RANK[room(target)] > RANK[room(name)]
    ]
    assert not upward, "imports that point up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    edges = internal_edges()
    # a package's __init__ re-exporting its own modules is no cycle of ideas: leave package faces out
    faces = {name for name, path in modules().items() if path.name == "__init__.py"}
    graph = {name: {target for target in targets if target not in faces} for name, targets in edges.items()
             if name not in faces}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_imports_stand_at_the_top():
    inside = []
    for name, path in modules().items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for imported, line, nested in imports(path):
            if not nested or imported.split(".")[0] in LAZY and "lazy" in " ".join(lines[line - 3 : line]).lower():
                continue
            inside.append(f"{name}:{line} {imported}")
    assert not inside, "imports inside functions (move them to the top):\n" + "\n".join(sorted(set(inside)))


LONGEST_FUNCTION = 60  # lines of a function's body, its docstring left out


def test_functions_are_short():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                body = body[1:]  # the docstring
            if not body:
                continue
            lines = body[-1].end_lineno - body[0].lineno + 1
            if lines > LONGEST_FUNCTION:
                long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, f"functions over {LONGEST_FUNCTION} lines (split them):\n" + "\n".join(long)
