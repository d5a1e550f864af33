"""common/'s layering: every module imports, no import cycles, and packages depend downwards.

    core <- device <- ops <- {nn, attention, kv, quant} <- {engine, parallel, transforms} <- io
         <- bench

A package may import packages in lower tiers; within a tier only the edges in SAME_TIER.
Model files compose nn/ layers and never name a kernel, a cache, a loader or a rank.
Imports under `if TYPE_CHECKING:` are annotations only and are not counted; imports inside
functions are (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIERS = {
    "core": 0,
    "device": 1,
    "ops": 2,
    **dict.fromkeys(("nn", "attention", "kv", "quant"), 3),
    **dict.fromkeys(("engine", "parallel", "transforms"), 4),
    "io": 5,
    "bench": 6,
}
SAME_TIER = {  # (importer, imported): allowed edges inside one tier
    ("kv", "attention"),  # KV storage builds the attention metadata (attention.meta)
}
MODELS_MAY_IMPORT = {"core", "nn"}


def _modules(package: str) -> list[str]:
    return sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / package).rglob("*.py")
    )


def _file(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _is_type_checking(node: ast.If) -> bool:
    return (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING") or (
        isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"
    )


def imports(module: str) -> set[str]:
    """The common.* modules `module` imports (resolved to modules, not names in them)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # `from common.attention import paged` names a module
                sub = f"{node.module}.{a.name}"
                found.add(sub if _file(sub).exists() else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(_file(module).read_text()))
    return {m for m in found if m.startswith("common.") and _file(m).exists()}


COMMON = _modules("common")
GRAPH = {m: imports(m) for m in COMMON}


def _package(module: str) -> str:
    return module.split(".")[1]


@pytest.mark.parametrize("module", COMMON)
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_no_import_cycles() -> None:
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(GRAPH.get(m, ())):
            if state.get(n) == "open":
                cycle = path[path.index(n) :] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, [*path, n])
        state[m] = "done"

    for m in COMMON:
        if m not in state:
            visit(m, [m])


def _violations() -> set[tuple[str, str]]:
    bad = set()
    for m, deps in GRAPH.items():
        for d in deps:
            a, b = _package(m), _package(d)
            if a == b or TIERS[b] < TIERS[a] or (a, b) in SAME_TIER:
                continue
            bad.add((m, d))
    return bad


def test_packages_import_only_downwards() -> None:
    assert all(_package(m) in TIERS for m in COMMON if m.count(".") > 1), "a package without tier"
    bad = _violations()
    assert not bad, "imports against the layering: " + ", ".join(f"{a} -> {b}" for a, b in bad)


def test_models_compose_nn_layers_only() -> None:
    for m in _modules("models"):
        for d in imports(m):
            assert _package(d) in MODELS_MAY_IMPORT, f"{m} imports {d}"
