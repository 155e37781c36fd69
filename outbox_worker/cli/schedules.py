"""``outbox-worker schedules``: each periodic job, when it last ran and when it runs next; what
the admin API's ``GET /schedules`` answers, and ``--json`` prints it as it does."""

from __future__ import annotations

from rich import box
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncConnection

from outbox_worker import admin
from outbox_worker.cli.database import in_transaction
from outbox_worker.cli.output import MISSING, print_json, stdout, visible
from outbox_worker.cli.params import AsJson, DatabaseUrl, resolve_dsn
from outbox_worker.formatting import format_duration, format_time


def schedules(as_json: AsJson = False, database_url: DatabaseUrl = None) -> None:
    """Periodic jobs: their cron expression, last tick and its job, next tick."""
    dsn = resolve_dsn(database_url)

    async def call(conn: AsyncConnection) -> list[admin.ScheduleInfo]:
        return await admin.list_schedules(conn)

    found = in_transaction(dsn, call)
    if as_json:
        print_json({"schedules": [entry.as_dict() for entry in found]})
        return
    console = stdout()
    if not found:
        console.print("no schedules: workers declare them from their registry when they start")
        return
    table = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("NAME", "TASK", "CRON", "LAST TICK (UTC)", "LAST JOB", "NEXT TICK (UTC)"):
        table.add_column(column, overflow="fold")
    for entry in found:
        job = MISSING
        if entry.last_job_id is not None:
            job = f"{entry.last_job_id} {entry.last_job_state or 'pruned'}"
        cron = entry.cron if entry.timezone == "UTC" else f"{entry.cron} ({entry.timezone})"
        table.add_row(
            visible(entry.name),
            visible(entry.task),
            visible(cron),
            format_time(entry.last_tick, short=True),
            job,
            format_time(entry.next_tick, short=True) + (" !" if entry.unfired else ""),
        )
    console.print(table)
    for entry in found:
        if entry.unfired:
            overdue = format_duration(entry.overdue_seconds)
            console.print(
                f"! {visible(entry.name)}: its next tick is {overdue} overdue: no worker fires"
                " it (taken out of the code, or its workers are down)",
                soft_wrap=True,
            )
