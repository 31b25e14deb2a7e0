"""The package layout is the architecture: each package imports only the layers below it,
and no module imports itself back through others. A static walk of every ``import`` in
disttrain/ (lazy imports inside functions included, so a cycle cannot hide in one)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "disttrain"

#: lowest first; a package may import its own modules and those of lower layers only.
LAYERS = [
    {"distributed"},                                    # where am I, process groups, launchers
    {"config"},                                         # typed sections, errors, generic checks
    {"data", "models", "checkpoint", "sweep"},          # leaves the engine composes
    {"memory", "observe", "resilience", "parallel", "ps"},
    {"strategies"},                                     # parallelize + forward/backward
    {"engine"},                                         # the loop, the step, builders, pre-flight
    {"plan"},                                           # predicts by building engines
    {"cli", "testing"},                                 # the Hydra app, sub-commands, test helpers
    {"__main__"},                                       # `disttrain` / `python -m disttrain`
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if "conf" not in p.relative_to(PACKAGE).parts}


def _imports(path: Path, known: set[str]) -> set[str]:
    """disttrain modules this file imports (``from disttrain.x import y`` counts y if y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "disttrain":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "disttrain"}
    return found & known


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


GRAPH = {name: _imports(path, set(_modules())) for name, path in _modules().items()}


def test_every_package_has_a_layer():
    packages = {_package(m) for m in GRAPH} - {""}
    assert packages <= set(LEVEL), f"add {sorted(packages - set(LEVEL))} to LAYERS"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    own = _package(module)
    if not own:  # disttrain/__init__.py re-exports the public API (load_model_state)
        return
    upward = [t for t in GRAPH[module] if _package(t) and _package(t) != own and LEVEL[_package(t)] >= LEVEL[own]]
    assert not upward, f"{module} (layer {LEVEL[own]}) imports {upward}: pass it in from above instead"


def test_no_import_cycles():
    """Depth-first search for a back edge over the module graph (package __init__s excluded as
    targets of their own submodules, which Python imports first anyway)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node], _ = 1, stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if node.startswith(nxt + "."):
                continue  # a submodule importing its own package
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        state[node], _ = 2, stack.pop()

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_the_walk_sees_a_known_edge():
    """The checker itself: the engine's run does import the checkpoint commit module."""
    assert "disttrain.checkpoint.commit" in GRAPH["disttrain.engine.run"]
