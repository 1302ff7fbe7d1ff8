"""The 3.10 stand-ins behave as 3.11's stdlib names, and no module bypasses supervisor._compat."""

from __future__ import annotations

import ast
import enum
import importlib
import importlib.util
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2] / "supervisor"

# What 3.10 lacks, as `module: names`; only supervisor/_compat.py may import these directly.
NEWER_THAN_310 = {"tomllib": None, "enum": {"StrEnum"}, "typing": {"Self"}}


def _load_fallback(monkeypatch: pytest.MonkeyPatch) -> type[enum.Enum]:
    """Run _compat.py's 3.10 branch here: the source with its version check forced false."""
    source = (ROOT / "_compat.py").read_text(encoding="utf-8")
    patched = source.replace("if sys.version_info >= (3, 11):", "if False:")
    assert patched != source, "supervisor/_compat.py no longer branches on (3, 11)"
    # The 3.10 deps may be absent here; what they provide is what 3.11's stdlib has.
    if importlib.util.find_spec("tomli") is None:
        monkeypatch.setitem(sys.modules, "tomli", importlib.import_module("tomllib"))
    if importlib.util.find_spec("typing_extensions") is None:
        monkeypatch.setitem(sys.modules, "typing_extensions", typing)
    namespace: dict[str, object] = {"__name__": "supervisor._compat_310"}
    exec(compile(patched, "supervisor/_compat.py", "exec"), namespace)  # noqa: S102
    fallback = namespace["StrEnum"]
    assert isinstance(fallback, type)
    assert issubclass(fallback, enum.Enum)
    return fallback


def test_fallback_str_enum_matches_the_stdlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """str(), format(), ==, json-ready value and auto() agree with 3.11's enum.StrEnum."""
    fallback = _load_fallback(monkeypatch)
    stdlib = enum.StrEnum
    bases: tuple[Any, ...] = (fallback, stdlib)
    for base in bases:
        kind: Any = base("Kind", {"OOM": "oom", "FITS": enum.auto()})
        assert str(kind.OOM) == "oom"
        assert f"{kind.OOM}|{kind.OOM:>5}" == "oom|  oom"
        assert kind.OOM == "oom"
        assert isinstance(kind.OOM, str)
        assert kind.FITS.value == "fits"
        assert kind("oom") is kind.OOM


@pytest.mark.skipif(sys.version_info < (3, 11), reason="compares with 3.11's own names")
def test_compat_is_the_stdlib_on_311() -> None:
    """On 3.11+ nothing is backported: the names are the stdlib's own objects."""
    from typing import Self  # noqa: PLC0415

    import tomllib  # noqa: PLC0415

    from supervisor import _compat  # noqa: PLC0415

    assert _compat.StrEnum is enum.StrEnum
    assert _compat.tomllib is tomllib
    assert _compat.Self is Self


def _direct_imports() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [f"{path.relative_to(ROOT)}:{node.lineno} import {a.name}"
                          for a in node.names if a.name in NEWER_THAN_310]
            elif isinstance(node, ast.ImportFrom) and node.module in NEWER_THAN_310:
                wanted = NEWER_THAN_310[node.module]
                found += [f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} "
                          f"import {a.name}"
                          for a in node.names if wanted is None or a.name in wanted]
    return found


def test_only_compat_imports_what_310_lacks() -> None:
    """The supervisor runs on 3.10: tomllib, StrEnum and Self come from supervisor._compat."""
    assert _direct_imports() == []
