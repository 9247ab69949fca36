"""The import layering of docs/layout.md, read from the code: every ``import`` of ``softmask`` (lazy ones
inside functions included) points to a lower layer, and no modules import each other in a circle.
Nothing is imported or run; the files are parsed."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

SRC = ROOT / "src" / "softmask"

# Each part of the package (a subpackage or a top-level module) and its layer: a part imports only parts
# of lower layers (docs/layout.md, "Imports point one way").
LAYERS = {
    "config": 0, "checkpoint_files": 0, "side_by_side": 0,
    "objectives": 1, "runs": 1,
    "data": 2, "models": 2,
    "world": 3, "train": 3, "__init__": 3,
    "eval": 4,
    "inference": 5, "tasks": 5,
    "viz": 6, "bench": 6,
    "explore": 7, "demo": 7,
    "cli": 8,
    "__main__": 9,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The ``softmask`` modules a file imports, anywhere in it (``from package import module`` imports that
    module, ``from package import name`` the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "softmask")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "softmask":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in SRC.rglob("*.py")}
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def test_every_part_of_the_package_has_a_layer():
    parts = {part_of(module) for module in import_graph()}
    missing, gone = sorted(parts - set(LAYERS)), sorted(set(LAYERS) - parts)
    assert not missing and not gone, f"give these a layer: {missing}; no longer there: {gone}"


def test_imports_point_down_the_layers():
    upward = sorted(f"{module} imports {target}" for module, targets in import_graph().items() for target in targets
                    if part_of(target) != part_of(module) and LAYERS[part_of(target)] >= LAYERS[part_of(module)])
    assert not upward, "\n".join(upward)


def test_no_modules_import_each_other_in_a_circle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path, module, target]
            if target in graph and state.get(target) is None:
                circle = visit(target, [*path, module])
                if circle:
                    return circle
        state[module] = 2
        return None

    for module in sorted(graph):
        if state.get(module) is None:
            circle = visit(module, [])
            assert circle is None, " -> ".join(circle)
