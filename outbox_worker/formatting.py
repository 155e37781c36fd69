"""Times, durations and messages as people read them: one form for every face (the CLI's
tables, the dashboard's pages, log lines), so an operator reading either sees the same
"3 min 5 s" and the same line of an error."""

from __future__ import annotations

from datetime import UTC, datetime

# Each face says "no value" in its own medium: the dashboard's pages with a dash, the CLI's
# ASCII tables with a hyphen (as for every other empty cell there).
MISSING = "—"


def format_duration(seconds: float) -> str:
    """``4.2 s``, ``42 s``, ``3 min 5 s``, ``2 h 10 min``, ``4 d 3 h`` (a zero tail left out)."""
    if seconds < 10:
        return f"{max(0.0, seconds):.1f} s"
    whole = int(seconds)
    units = [("d", 86400), ("h", 3600), ("min", 60), ("s", 1)]
    for index, (name, size) in enumerate(units):
        if whole >= size:
            lead, rest = divmod(whole, size)
            if index + 1 == len(units):
                return f"{lead} {name}"
            tail_name, tail_size = units[index + 1]
            tail = rest // tail_size
            return f"{lead} {name} {tail} {tail_name}" if tail else f"{lead} {name}"
    return f"{whole} s"


def format_time(moment: datetime | None, *, short: bool = False, missing: str = MISSING) -> str:
    """``2024-05-01 12:30:05 UTC``, to the second and always in UTC, whatever the zone of the
    server or the reader. ``short`` (``05-01 12:30:05``) is for a table column whose heading
    says UTC."""
    if moment is None:
        return missing
    return moment.astimezone(UTC).strftime("%m-%d %H:%M:%S" if short else "%Y-%m-%d %H:%M:%S UTC")


def format_relative(moment: datetime | None, now: datetime | None = None) -> str:
    """``3 min 5 s ago``, ``in 42 s``, ``now``; empty for no time at all."""
    if moment is None:
        return ""
    delta = ((now or datetime.now(UTC)) - moment).total_seconds()
    if abs(delta) < 1:
        return "now"
    return f"{format_duration(delta)} ago" if delta > 0 else f"in {format_duration(-delta)}"


def one_line(text: object) -> str:
    """Any message on one line: an error line must stay one line on stderr or in a cell."""
    return " ".join(str(text).split())


def error_line(exc: BaseException) -> str:
    """``ValueError: what went wrong``: an exception as a log field."""
    return f"{type(exc).__name__}: {exc}"


def first_line(text: str | None, width: int) -> str:
    """The line of a stored error that says what it is, cut to ``width``: what fits a table
    cell. A traceback's last line names the exception; anything else reads best from the
    top."""
    if not text:
        return ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines and lines[0].startswith("Traceback") else (lines or [""])[0]
    return line if len(line) <= width else line[: width - 1] + "…"
