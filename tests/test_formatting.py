"""Messages as every face shows them: the CLI's cells, the dashboard's pages, log lines."""

from __future__ import annotations

import pytest

from outbox_worker.cli.output import first_line as cli_first_line
from outbox_worker.formatting import error_line, first_line, one_line

TRACEBACK = """Traceback (most recent call last):
  File "tasks.py", line 3, in charge
    raise ValueError("card declined")
ValueError: card declined
"""


@pytest.mark.parametrize(
    ("text", "width", "shown"),
    [
        (None, 20, ""),
        ("", 20, ""),
        ("  \n \n", 20, ""),
        ("ValueError: card declined\n\nTraceback ...", 40, "ValueError: card declined"),
        (TRACEBACK, 40, "ValueError: card declined"),
        ("  indented first line  \nsecond", 40, "indented first line"),
        ("x" * 30, 10, "x" * 9 + "…"),
        ("x" * 10, 10, "x" * 10),
    ],
)
def test_first_line_is_the_line_that_says_what_went_wrong(
    text: str | None, width: int, shown: str
) -> None:
    assert first_line(text, width) == shown


def test_the_clis_first_line_escapes_what_a_terminal_would_obey() -> None:
    assert cli_first_line("boom \x1b[2J cleared", width=60) == "boom \\x1b[2J cleared"
    assert cli_first_line(TRACEBACK, width=60) == "ValueError: card declined"


def test_one_line_and_error_line() -> None:
    assert one_line("cannot\n  connect:\trefused ") == "cannot connect: refused"
    assert error_line(ValueError("card declined")) == "ValueError: card declined"
