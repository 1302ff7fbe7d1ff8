"""Imports go one way along DESIGN.md's data flow: no module imports one above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "supervisor"

# Lowest first. A module may import only modules of a lower layer (or its own package).
LAYERS: tuple[tuple[str, ...], ...] = (
    # 3.10 stand-ins for 3.11 stdlib names, and the text/file/echo edges: below all that use them
    ("_compat", "_lean", "text", "echo", "files", "bounds", "launchers"),
    ("knobs", "command", "secrets", "classify", "gpu", "device_memory", "models", "_sim", "fits",
     "rundir", "plot", "_inject", "_families"),
    ("program", "liveness", "rescue"),
    ("dialects", "policy", "_wrap", "estimate", "_estimate_child", "reference_trainer",
     "trainer_output"),
    ("events", "plan", "runner", "tracer"),
    ("journal", "checkpoints", "progress", "runconfig", "speed"),
    ("report", "notify", "remember"),
    ("console", "status", "loop"),
    ("cli", "__init__"),
    ("__main__",),
)
LAYER = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str:
    """`supervisor.dialects.argv` -> `dialects`; `supervisor` -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> list[tuple[str, str, int]]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        importer = _top(".".join(("supervisor", *path.relative_to(ROOT).with_suffix("").parts)))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "supervisor":
                    names = [f"supervisor.{a.name}" for a in node.names]
                elif node.module.startswith("supervisor."):
                    names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("supervisor.")]
            found += [(importer, _top(n), getattr(node, "lineno", 0)) for n in names]
    return found


def test_every_module_has_a_layer() -> None:
    """A new module must be placed in the data flow before it can import anything."""
    modules = {_top(".".join(("supervisor", *p.relative_to(ROOT).with_suffix("").parts)))
               for p in ROOT.rglob("*.py")}
    assert sorted(modules - set(LAYER)) == []


@pytest.mark.parametrize(("importer", "imported", "line"), _imports())
def test_imports_point_down(importer: str, imported: str, line: int) -> None:
    """pypa/build's rule: the builder never imports the CLI; here, nothing imports upward."""
    if imported in (importer, "__version__"):
        return
    assert LAYER[imported] < LAYER[importer], (
        f"supervisor/{importer} (layer {LAYER[importer]}) imports {imported} "
        f"(layer {LAYER[imported]}) at line {line}")
