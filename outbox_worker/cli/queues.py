"""``outbox-worker queues``: per queue, what waits, what runs and what finished lately (the
numbers the admin API's ``GET /queues`` answers) and the settings every worker obeys; and
``queues set|pause|resume`` to change those settings, through :mod:`outbox_worker.queue_settings`
as the other faces do."""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncConnection

from outbox_worker import admin, queue_settings
from outbox_worker.cli.database import in_transaction
from outbox_worker.cli.output import MISSING, first_line, print_json, stdout, visible
from outbox_worker.cli.params import AsJson, DatabaseUrl, duration, resolve_dsn
from outbox_worker.formatting import format_duration
from outbox_worker.jobs import JobState
from outbox_worker.queue_settings import MAX_CONCURRENCY, MAX_RATE_PERIOD, QueueSettings

DEFAULT_WINDOW = "5m"
QueueName = Annotated[str, typer.Argument(metavar="NAME", help="The queue's name.")]


def queues(
    ctx: typer.Context,
    window: Annotated[
        str, typer.Option(help="Count jobs finished within this long (e.g. 5m, 1h).")
    ] = DEFAULT_WINDOW,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Per queue: jobs by state, due now, age of the oldest due job, finished recently, and
    its settings (limit, pause). Its subcommands change those settings."""
    if ctx.invoked_subcommand is not None:
        # Silently ignored, a flag given before the subcommand would print text to a script
        # that asked for JSON, or change another database than the one named.
        given = [
            flag
            for flag, is_given in (
                ("--window", window != DEFAULT_WINDOW),
                ("--json", as_json),
                ("--database-url", database_url is not None),
            )
            if is_given
        ]
        if given:
            raise typer.BadParameter(
                f"give it after the subcommand: outbox-worker queues {ctx.invoked_subcommand} "
                f"... {given[0]}",
                param_hint=given[0],
            )
        return
    window_seconds = duration(window, "--window", positive=True).total_seconds()
    dsn = resolve_dsn(database_url)

    async def call(conn: AsyncConnection) -> list[queue_settings.QueueView]:
        return await queue_settings.queue_views(conn, window_seconds=window_seconds)

    views = in_transaction(dsn, call)
    if as_json:
        print_json(
            {
                "queues": [
                    view.stats.as_dict() | {"settings": view.settings.as_dict()} for view in views
                ],
                "window_seconds": window_seconds,
            }
        )
        return
    console = stdout()
    if not views:
        console.print("no jobs in any queue")
        return
    table = Table(
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        caption=f"(+N): finished within the last {window}",
        caption_justify="left",
    )
    for column in ("QUEUE", "QUEUED", "DUE", "RUNNING", "OLDEST DUE", *admin.FINISHED):
        table.add_column(column.upper(), justify="left" if column == "QUEUE" else "right")
    # Folded, not cut short: a narrow terminal must still show every limit whole.
    table.add_column("LIMIT", justify="right", overflow="fold")
    table.add_column("PAUSED", overflow="fold")
    for view in views:
        entry, setting = view.stats, view.settings
        oldest = entry.oldest_due_seconds
        table.add_row(
            entry.queue,
            str(entry.depth.get(JobState.QUEUED, 0)),
            str(entry.due),
            str(entry.depth.get(JobState.RUNNING, 0)),
            format_duration(oldest) if oldest > 0 else MISSING,
            *(
                f"{entry.depth.get(state, 0)} (+{entry.finished_recently.get(state, 0)})"
                for state in admin.FINISHED
            ),
            _limit_cell(setting),
            _paused_cell(setting),
        )
    console.print(table)


def _limit_cell(setting: QueueSettings) -> str:
    """The limits in short: ``5 1/key 50/1min 2/key/10s``."""

    def per(window: float) -> str:
        return format_duration(window).replace(" ", "")

    parts = [
        *([] if setting.concurrency is None else [str(setting.concurrency)]),
        *([] if setting.key_concurrency is None else [f"{setting.key_concurrency}/key"]),
        *(
            []
            if setting.rate_limit is None
            else [f"{setting.rate_limit}/{per(setting.rate_period)}"]
        ),
        *(
            []
            if setting.key_rate_limit is None
            else [f"{setting.key_rate_limit}/key/{per(setting.key_rate_period)}"]
        ),
    ]
    return " ".join(parts) or MISSING


def _paused_cell(setting: QueueSettings) -> str:
    if not setting.paused:
        return ""
    if not setting.pause_reason:
        return "yes"
    return f"yes ({first_line(setting.pause_reason, width=40)})"


def concurrency_limit(
    value: str, flag: str = "--concurrency", none_means: str = "no limit"
) -> int | None:
    """``--concurrency 5``, or ``none`` for no limit (``--breaker`` likewise); anything else
    is a usage error naming the flag, before the database is reached."""
    text = value.strip()
    if text.lower() == "none":
        return None
    # ASCII digits only: int() also reads other scripts' digits and "1_0", which nobody means.
    digits = text.isascii() and text.isdigit() and len(text) <= len(str(MAX_CONCURRENCY))
    if not digits or not 1 <= int(text) <= MAX_CONCURRENCY:
        raise typer.BadParameter(
            f"{value!r} is not a whole number from 1 to {MAX_CONCURRENCY}, nor none for "
            f"{none_means}",
            param_hint=flag,
        )
    return int(text)


def rate_limit(value: str, flag: str = "--rate") -> tuple[int | None, float]:
    """``--rate 50/1s`` (starts, window), or ``none`` (``--key-rate`` likewise); anything
    else is a usage error."""
    if value.strip().lower() == "none":
        return None, 1.0
    count, slash, window = value.partition("/")
    if not slash:
        raise typer.BadParameter(
            f"{value!r} is not N/PERIOD (50/1s, 1000/1h), nor none", param_hint=flag
        )
    limit = concurrency_limit(count, flag, "no rate limit")
    period = duration(window.strip(), flag, positive=True).total_seconds()
    if period > MAX_RATE_PERIOD:
        raise typer.BadParameter(f"the window {window!r} is longer than a day", param_hint=flag)
    return limit, period


def _report(setting: QueueSettings, as_json: bool) -> None:
    if as_json:
        print_json(setting.as_dict())
    else:
        # The line's only free text is the pause reason: escaped for the terminal.
        stdout().print(visible(f"queue {setting.name}: {setting.describe()}"), soft_wrap=True)


def queues_set(
    name: QueueName,
    concurrency: Annotated[
        str | None,
        typer.Option(
            metavar="N|none",
            help="At most N of the queue's jobs running at once across every worker; "
            "none lifts the limit.",
        ),
    ] = None,
    key_concurrency: Annotated[
        str | None,
        typer.Option(
            metavar="N|none",
            help="At most N jobs of one concurrency key running at once, the keys served "
            "in turn; none lifts the limit.",
        ),
    ] = None,
    rate: Annotated[
        str | None,
        typer.Option(
            metavar="N/PERIOD|none",
            help="At most N of the queue's jobs started in any window of PERIOD (50/1s, "
            "1000/1h); none lifts the limit.",
        ),
    ] = None,
    key_rate: Annotated[
        str | None,
        typer.Option(
            metavar="N/PERIOD|none",
            help="At most N jobs of one concurrency key started in any window of PERIOD, "
            "the other keys going on; none lifts the limit.",
        ),
    ] = None,
    breaker: Annotated[
        str | None,
        typer.Option(
            metavar="N|none",
            help="Pause the queue once one of its tasks fails N attempts in a row; "
            "none turns it off.",
        ),
    ] = None,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Limit how many of a queue's jobs run at once, across every worker and host, and when
    its circuit breaker pauses it."""
    if all(v is None for v in (concurrency, key_concurrency, rate, key_rate, breaker)):
        raise typer.BadParameter(
            "give --concurrency, --key-concurrency, --rate, --key-rate, --breaker or several",
            param_hint="--concurrency",
        )
    per_window = None if rate is None else rate_limit(rate)
    per_key_window = None if key_rate is None else rate_limit(key_rate, "--key-rate")
    limit = None if concurrency is None else concurrency_limit(concurrency)
    per_key = (
        None
        if key_concurrency is None
        else concurrency_limit(key_concurrency, "--key-concurrency", "no limit per key")
    )
    threshold = None if breaker is None else concurrency_limit(breaker, "--breaker", "no breaker")
    dsn = resolve_dsn(database_url)

    async def call(conn: AsyncConnection) -> QueueSettings:
        setting = await queue_settings.get_settings(conn, name)
        if concurrency is not None:
            setting = await queue_settings.set_concurrency(conn, name, limit)
        if key_concurrency is not None:
            setting = await queue_settings.set_key_concurrency(conn, name, per_key)
        if per_window is not None:
            setting = await queue_settings.set_rate(conn, name, *per_window)
        if per_key_window is not None:
            setting = await queue_settings.set_key_rate(conn, name, *per_key_window)
        if breaker is not None:
            setting = await queue_settings.set_breaker(conn, name, threshold)
        return setting

    _report(in_transaction(dsn, call), as_json)


def queues_pause(
    name: QueueName,
    reason: Annotated[
        str | None, typer.Option(help="Why, shown with the pause wherever it is listed.")
    ] = None,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Start no more jobs of a queue until it is resumed; jobs running finish."""
    dsn = resolve_dsn(database_url)

    async def call(conn: AsyncConnection) -> QueueSettings:
        return await queue_settings.pause(conn, name, reason=reason)

    _report(in_transaction(dsn, call), as_json)


def queues_resume(
    name: QueueName, as_json: AsJson = False, database_url: DatabaseUrl = None
) -> None:
    """Let a paused queue start jobs again, whoever paused it."""
    dsn = resolve_dsn(database_url)

    async def call(conn: AsyncConnection) -> QueueSettings:
        return await queue_settings.resume(conn, name)

    _report(in_transaction(dsn, call), as_json)
