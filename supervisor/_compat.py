"""What Python 3.11 added that the supervisor uses, with the 3.10 stand-ins (layer 0)."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from enum import StrEnum
    from typing import Self

    import tomllib
else:  # pragma: no cover - exercised by tests/process/test_python310.py under 3.10
    from enum import Enum

    import tomli as tomllib
    from typing_extensions import Self

    class StrEnum(str, Enum):
        """3.11's enum.StrEnum: members are str, str() and format() give the value."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, format_spec: str) -> str:
            return str.__format__(str(self.value), format_spec)

        @staticmethod
        def _generate_next_value_(
            name: str, start: int, count: int, last_values: list[str]
        ) -> str:
            """auto() gives the lower-cased member name, as 3.11 does."""
            del start, count, last_values
            return name.lower()

__all__ = ["Self", "StrEnum", "tomllib"]
