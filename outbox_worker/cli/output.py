"""What the commands print: lines and rich tables on stdout, JSON for scripts, and every text
a job carries made safe for a terminal before it gets there."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta

from pydantic_core import to_jsonable_python
from rich.console import Console
from rich.text import Text

from outbox_worker import formatting
from outbox_worker.jobs import JobState

STATE_STYLES = {
    JobState.QUEUED: "cyan",
    JobState.RUNNING: "yellow",
    JobState.SUCCEEDED: "green",
    JobState.DEAD: "bold red",
    JobState.CANCELLED: "dim",
}

# How the tables say "no value": ASCII, like the rest of a terminal's cells.
MISSING = "-"


def stdout() -> Console:
    """Markup off: job errors and arguments are shown as written ("[Errno 111]" included)."""
    return Console(markup=False, highlight=False, soft_wrap=False)


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        # As the HTTP API writes it (pydantic: UTC as Z), so --json and HTTP agree.
        return to_jsonable_python(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def print_json(data: object) -> None:
    """``--json``: one document on stdout and nothing else, for scripts."""
    sys.stdout.write(json.dumps(data, default=_json_default, indent=2, ensure_ascii=False))
    sys.stdout.write("\n")


# What jobs carry (errors, arguments, worker ids) may hold characters a terminal obeys rather
# than shows: escape sequences, C1 controls (\x9b opens one too), a carriage return that
# overwrites the line, bidirectional overrides that reorder it. Shown escaped, as \x1b.
_ESCAPED = {
    code: ascii(chr(code))[1:-1]
    for code in (*range(0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A))
    if chr(code) != "\t"
}
_ESCAPED_BUT_NEWLINES = {code: text for code, text in _ESCAPED.items() if chr(code) != "\n"}


def visible(text: str, *, lines: bool = False) -> str:
    """``text`` safe for a terminal; ``lines`` keeps its newlines (a traceback's)."""
    return text.translate(_ESCAPED_BUT_NEWLINES if lines else _ESCAPED)


def state_text(state: JobState) -> Text:
    return Text(state.value, style=STATE_STYLES.get(state, ""))


def first_line(text: str | None, width: int = 60) -> str:
    """The line of an error that fits a table cell, safe for a terminal."""
    return formatting.first_line(visible(text, lines=True) if text else text, width)
