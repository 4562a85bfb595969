"""The package's shape: no import cycles, and no layer importing a layer above it.

Imports are read with `ast` from the source, every one of them: at module level, inside
functions and under `if TYPE_CHECKING:` alike, since a cycle hidden in any of those still ties
the modules together. An edge goes to the module named (`from ipa_ops.generate import tasks`
is an edge to `ipa_ops.generate.tasks`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ipa_ops"

# Bottom to top. A module may import its own package and packages of a lower rank; packages of
# the same rank are independent of each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("ipa_ops", "ipa_ops.errors", "ipa_ops.canonical"),
    ("ipa_ops.storage", "ipa_ops.zoo"),
    ("ipa_ops.flow",),
    ("ipa_ops.records",),
    ("ipa_ops.manifest", "ipa_ops.store"),
    ("ipa_ops.outputs",),
    ("ipa_ops.generate", "ipa_ops.doctor", "ipa_ops.scores", "ipa_ops.export"),
    ("ipa_ops.report",),
    ("ipa_ops.stages",),
    ("ipa_ops.runner", "ipa_ops.cluster"),
    ("ipa_ops.commands",),
    ("ipa_ops.cli",),
)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same top package it imports (anywhere in its source)."""
    files = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    top = root.name
    graph: dict[str, set[str]] = {m: set() for m in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against this module's package
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files and target.split(".")[0] == top:
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if target in files and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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


def layer_of(module: str) -> tuple[int, str]:
    """(rank, owning package) of a module: the longest LAYERS entry that is it or contains it."""
    best: tuple[int, str] | None = None
    for rank, names in enumerate(LAYERS):
        for owner in names:
            if (module == owner or module.startswith(owner + ".")) and (best is None or len(owner) > len(best[1])):
                best = (rank, owner)
    if best is None:
        raise AssertionError(f"{module}: in no layer; add its package to LAYERS in tests/test_architecture.py")
    return best


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        rank, owner = layer_of(module)
        for target in sorted(targets):
            t_rank, t_owner = layer_of(target)
            if t_rank > rank or (t_rank == rank and t_owner != owner and owner != "ipa_ops"):
                bad.append(f"{module} imports {target} ({t_owner} is not below {owner})")
    return bad


def test_no_import_cycles() -> None:
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_layers_import_only_downwards() -> None:
    assert layer_violations(import_graph(PACKAGE)) == []


def test_row_contract_imports_nothing_of_the_engine() -> None:
    """Planning, faces and tasks depend on the contract; the contract depends on the flow format only."""
    graph = import_graph(PACKAGE)
    assert graph["ipa_ops.generate.contract"] <= {"ipa_ops.flow.schedules"}
    engine = {"ipa_ops.generate.generator", "ipa_ops.generate.tasks", "ipa_ops.generate.faceid"}
    for planning in (
        "ipa_ops.generate.plan",
        "ipa_ops.generate.prepare",
        "ipa_ops.generate.faceid",
        "ipa_ops.generate.tasks",
    ):
        assert "ipa_ops.generate.generator" not in graph[planning], planning
    families = {m: t for m, t in graph.items() if m.startswith("ipa_ops.generate.families")}
    for module, targets in families.items():  # a family knows the attention and the format, not the engine
        assert not targets & (engine | {"ipa_ops.generate.plan", "ipa_ops.generate.loaded"}), module


@pytest.mark.parametrize(
    ("files", "expect_cycle"),
    [
        ({"a.py": "from pkg import b\n", "b.py": "def f():\n    from pkg.a import x\n"}, True),
        ({"a.py": "import typing\nif typing.TYPE_CHECKING:\n    from .b import y\n", "b.py": "from . import a"}, True),
        ({"a.py": "from pkg import b\n", "b.py": "import os\n"}, False),
    ],
)
def test_the_checker_sees_hidden_cycles(tmp_path: Path, files: dict[str, str], expect_cycle: bool) -> None:
    """Imports inside functions and under TYPE_CHECKING count, as they did in the tangle this replaced."""
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    for name, text in files.items():
        (root / name).write_text(text)
    assert bool(cycles(import_graph(root))) is expect_cycle


def test_the_checker_sees_an_upward_import() -> None:
    graph = {"ipa_ops.flow.spec": {"ipa_ops.generate.generator"}, "ipa_ops.generate.generator": set()}
    assert layer_violations(graph) == [
        "ipa_ops.flow.spec imports ipa_ops.generate.generator (ipa_ops.generate is not below ipa_ops.flow)"
    ]
