"""``outbox-worker queues``: per queue, what waits, what runs and what finished lately; the
numbers the admin API's ``GET /queues`` answers, and ``--json`` prints them as it does."""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncConnection

from outbox_worker import admin
from outbox_worker.cli.database import in_transaction
from outbox_worker.cli.output import MISSING, print_json, stdout
from outbox_worker.cli.params import AsJson, DatabaseUrl, duration, resolve_dsn
from outbox_worker.formatting import format_duration
from outbox_worker.jobs import JobState


def queues(
    window: Annotated[
        str, typer.Option(help="Count jobs finished within this long (e.g. 5m, 1h).")
    ] = "5m",
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Per queue: jobs by state, due now, age of the oldest due job, finished recently."""
    window_seconds = duration(window, "--window", positive=True).total_seconds()
    dsn = resolve_dsn(database_url)

    async def call(conn: AsyncConnection) -> list[admin.QueueStats]:
        return await admin.queue_stats(conn, window_seconds=window_seconds)

    stats = in_transaction(dsn, call)
    if as_json:
        print_json(
            {"queues": [entry.as_dict() for entry in stats], "window_seconds": window_seconds}
        )
        return
    console = stdout()
    if not stats:
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
    for entry in stats:
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
        )
    console.print(table)
