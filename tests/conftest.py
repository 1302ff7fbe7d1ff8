"""Shared fixtures: each test starts from structlog's defaults (the CLI configures it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    # cli.main() binds structlog to the stderr of its test, which pytest closes afterwards.
    yield
    structlog.reset_defaults()
