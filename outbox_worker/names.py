"""The one rule for task and queue names, shared by Python checks and the table's CHECK."""

from __future__ import annotations

import re

NAME_MAX_LENGTH = 128
NAME_PATTERN = rf"^[A-Za-z][A-Za-z0-9_.:-]{{0,{NAME_MAX_LENGTH - 1}}}$"
_NAME = re.compile(NAME_PATTERN)


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def name_check(column: str) -> str:
    """NAME_PATTERN as a CHECK expression, its length bound taken out of the regex.

    PostgreSQL re-evaluates every CHECK on every UPDATE, and its regex engine expands the
    bounded repeat ``{0,127}`` into a large automaton: written that way, the two name checks
    cost a third of the worker's complete-and-claim statement.
    """
    return f"{column} ~ '^[A-Za-z][A-Za-z0-9_.:-]*$' AND length({column}) <= {NAME_MAX_LENGTH}"
