"""structlog without what a run never uses: rich's tracebacks and asyncio.

`import structlog` imports `structlog.dev`, which imports rich (tracebacks, pretty-printing)
when it is installed, and `structlog.stdlib`, which imports asyncio (with ssl and socket) for
its async logging methods. The supervisor renders its own console lines and never logs from
a coroutine, so `python -m supervisor` imports structlog through `import_structlog`: rich is
hidden from it (structlog then formats exceptions plainly) and asyncio is a stand-in that
imports the real module the first time anything of it is used. Both are put back at once:
a later `import rich` (the live console on a terminal) or `import asyncio` gets the real one.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _OnDemand(types.ModuleType):
    """A module whose first attribute lookup imports the real one (and answers from it)."""

    def __getattr__(self, name: str) -> object:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), name)


def import_structlog() -> None:
    """Import structlog without rich and with asyncio deferred (a no-op once imported)."""
    if "structlog" in sys.modules:
        return
    modules: dict[str, Any] = sys.modules  # holds None too: "absent" to the import system
    hidden = "rich" not in modules
    stand_in = None
    if hidden:
        modules["rich"] = None  # the import system's mark of a module that is not there
    if "asyncio" not in sys.modules:
        stand_in = sys.modules["asyncio"] = _OnDemand("asyncio")
    try:
        import structlog  # noqa: F401, PLC0415 - the point of this function
    finally:
        if hidden and "rich" in modules and modules["rich"] is None:
            del modules["rich"]
        if stand_in is not None and sys.modules.get("asyncio") is stand_in:
            del sys.modules["asyncio"]
