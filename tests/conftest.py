"""Shared fixtures: each test starts from structlog's defaults (the CLI configures it), and no
test writes into the user's own cache or data folders (help cache, remembered fits)."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import structlog

# Set before any test (and any process a test starts) looks: one private folder per session.
_HOME = tempfile.mkdtemp(prefix="oom-supervisor-tests-")
os.environ["XDG_CACHE_HOME"] = os.path.join(_HOME, "cache")  # noqa: PTH118
os.environ["XDG_DATA_HOME"] = os.path.join(_HOME, "data")  # noqa: PTH118
atexit.register(functools.partial(shutil.rmtree, _HOME, ignore_errors=True))
# The tiers' venvs are built by `uv pip install`, which compiles no bytecode: with
# PYTHONDONTWRITEBYTECODE set (some shells and CI images set it) every process a test starts
# there would compile torch and transformers from source again (measured: `import
# bitsandbytes` past 60 s at load 8). The first process of each venv writes the bytecode.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


@pytest.fixture(autouse=True)
def _own_fit_store(tmp_path_factory: pytest.TempPathFactory,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Remembered fits are keyed by command and device: two tests running the same command
    # would otherwise start from each other's fit. Each test gets a store of its own.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data")))


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    # cli.main() binds structlog to the stderr of its test, which pytest closes afterwards.
    yield
    structlog.reset_defaults()
