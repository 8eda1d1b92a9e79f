"""The direction of dependencies (docs/architecture.md, "Layers"): envs import nothing of flowrl's
training, policies or data; flowrl's core imports no agent (the CLI reaches agents through
flowrl.registry); no import cycles between modules. Read from the source, so a lazy import inside a
function counts for the direction rules too."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"flowrl": REPO / "flowrl", "flowrl.envs": REPO / "envs", "flowrl.agents": REPO / "agents"}
ENVS_MAY_IMPORT = ("flowrl.envs", "flowrl.errors", "flowrl.plugins")


def _modules() -> dict[str, Path]:
    found = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _imports(path: Path, module: str) -> set[str]:
    """Every flowrl module ``path`` imports, at its top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative imports
                base = ".".join(module.split(".")[: -node.level] + [node.module])
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m == "flowrl" or m.startswith("flowrl.")}


def _known(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_envs_import_nothing_of_training_policies_or_data() -> None:
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("flowrl.envs"):
            bad = [m for m in _imports(path, name) if not m.startswith(ENVS_MAY_IMPORT)]
            assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_the_core_imports_no_agent() -> None:
    for name, path in _modules().items():
        if name.startswith(("flowrl.envs", "flowrl.agents")):
            continue
        bad = [m for m in _imports(path, name) if m.startswith("flowrl.agents")]
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: {k for m in _imports(path, name) if (k := _known(m, modules)) and k != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
