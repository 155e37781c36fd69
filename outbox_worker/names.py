"""The one pattern for task and queue names, shared by Python checks and the table's CHECK."""

from __future__ import annotations

import re

NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.:-]{0,127}$"
_NAME = re.compile(NAME_PATTERN)


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None
