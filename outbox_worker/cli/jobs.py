"""``outbox-worker jobs list|show|retry|cancel|retry-dead``: the admin API's job routes on
the command line, each call in a transaction of its own. ``--json`` prints what the routes
answer (:meth:`outbox_worker.jobs.Job.to_json`), so scripts can use either."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

import typer
from rich import box
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncConnection

from outbox_worker import admin
from outbox_worker.cli.database import in_transaction
from outbox_worker.cli.output import (
    MISSING,
    first_line,
    print_json,
    state_text,
    stdout,
    visible,
)
from outbox_worker.cli.params import AsJson, DatabaseUrl, JobId, resolve_dsn
from outbox_worker.formatting import format_time
from outbox_worker.jobs import Job, JobState


def _job_when(job: Job) -> datetime | None:
    """The time that matters for the job's state: due, started or finished."""
    if job.state == JobState.QUEUED:
        return job.run_at
    if job.state == JobState.RUNNING:
        return job.started_at
    return job.finished_at


def jobs_list(
    state: Annotated[
        str | None, typer.Option(help=f"Only jobs in this state ({', '.join(JobState)}).")
    ] = None,
    queue: Annotated[str | None, typer.Option(help="Only jobs of this queue.")] = None,
    task: Annotated[str | None, typer.Option(help="Only jobs of this task.")] = None,
    tag: Annotated[str | None, typer.Option(help="Only jobs with this tag.")] = None,
    limit: Annotated[int, typer.Option(help=f"Jobs per page (1 to {admin.MAX_PAGE}).")] = 50,
    cursor: Annotated[
        str | None, typer.Option(help="Where the previous page ended (its next cursor).")
    ] = None,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Jobs, newest first, a page at a time (pass the printed next cursor for the next page).

    WHEN is when a queued job is due, a running one started, a finished one finished."""
    dsn = resolve_dsn(database_url)

    async def call(conn: AsyncConnection) -> admin.JobPage:
        return await admin.list_jobs(
            conn, state=state, queue=queue, task=task, limit=limit, cursor=cursor, tag=tag
        )

    page = in_transaction(dsn, call)
    if as_json:
        print_json(
            {"items": [job.to_json() for job in page.items], "next_cursor": page.next_cursor}
        )
        return
    console = stdout()
    if not page.items:
        console.print("no jobs match" if cursor is None else "no more jobs")
        return
    table = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("ID", justify="right", no_wrap=True)
    table.add_column("QUEUE", no_wrap=True)
    table.add_column("TASK", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    table.add_column("TRIES", justify="right", no_wrap=True)
    table.add_column("WHEN (UTC)", no_wrap=True)
    table.add_column("LAST ERROR", overflow="fold")
    for job in page.items:
        table.add_row(
            str(job.id),
            job.queue,
            job.task,
            state_text(job.state),
            f"{job.attempts}/{job.max_attempts}",
            format_time(_job_when(job), short=True, missing=MISSING),
            first_line(job.last_error, width=40),
        )
    console.print(table)
    if page.next_cursor is not None:
        console.print(f"next cursor: {page.next_cursor}  (--cursor {page.next_cursor})")
    else:
        console.print("next cursor: none (last page)")


def _print_job(job: Job) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("id", str(job.id))
    table.add_row("task", job.task)
    table.add_row("queue", job.queue)
    table.add_row("state", state_text(job.state))
    table.add_row("attempts", f"{job.attempts} of {job.max_attempts}")
    if job.progress is not None:
        shown = (
            f"{job.progress:.0%}"
            if isinstance(job.progress, int | float)
            else json.dumps(job.progress, ensure_ascii=False)
        )
        table.add_row("progress", visible(shown))
    table.add_row("priority", str(job.priority))
    table.add_row("args", visible(json.dumps(job.args, indent=2, ensure_ascii=False), lines=True))
    if job.result is not None:
        result = json.dumps(job.result, indent=2, ensure_ascii=False)
        table.add_row("result", visible(result, lines=True))
    table.add_row("last error", visible(job.last_error or MISSING, lines=True))
    table.add_row("dedupe key", visible(job.dedupe_key or MISSING))
    if job.active_key is not None:
        table.add_row("active key", visible(job.active_key))
    if job.debounce_key is not None:
        table.add_row("debounce key", visible(job.debounce_key))
    table.add_row("correlation id", visible(job.correlation_id or MISSING))
    if job.trace_id is not None:
        table.add_row("trace id", job.trace_id)
    if job.tags:
        table.add_row("tags", visible(", ".join(job.tags)))
    if job.concurrency_key is not None:
        table.add_row("concurrency key", visible(job.concurrency_key))
    table.add_row("locked by", visible(job.locked_by or MISSING))
    for label, moment in (
        ("locked until", job.locked_until),
        ("run at", job.run_at),
        ("created at", job.created_at),
        ("started at", job.started_at),
        ("finished at", job.finished_at),
    ):
        table.add_row(label, format_time(moment, missing=MISSING))
    if job.cancel_requested_at is not None:
        table.add_row("cancel requested", format_time(job.cancel_requested_at))
    stdout().print(table)


def jobs_show(job_id: JobId, as_json: AsJson = False, database_url: DatabaseUrl = None) -> None:
    """One job: its arguments, attempts, last error and result. Times are UTC."""
    dsn = resolve_dsn(database_url)

    async def call(conn: AsyncConnection) -> Job:
        return await admin.require_job(conn, job_id)

    job = in_transaction(dsn, call)
    if as_json:
        print_json(job.to_json())
    else:
        _print_job(job)


def jobs_retry(job_id: JobId, as_json: AsJson = False, database_url: DatabaseUrl = None) -> None:
    """Queue a dead, cancelled or queued job to run now, with at least one more attempt."""
    dsn = resolve_dsn(database_url)

    async def call(conn: AsyncConnection) -> Job:
        return await admin.retry_job(conn, job_id)

    job = in_transaction(dsn, call)
    if as_json:
        print_json(job.to_json())
        return
    stdout().print(
        f"job {job.id} ({job.task}) is {job.state.value}: due now, "
        f"attempt {job.attempts + 1} of {job.max_attempts} next"
    )


def jobs_cancel(job_id: JobId, as_json: AsJson = False, database_url: DatabaseUrl = None) -> None:
    """Cancel a queued job at once, or ask a running job's worker to stop it."""
    dsn = resolve_dsn(database_url)

    async def call(conn: AsyncConnection) -> Job:
        return await admin.cancel_job(conn, job_id)

    job = in_transaction(dsn, call)
    if as_json:
        print_json(job.to_json())
        return
    if job.state == JobState.RUNNING:
        stdout().print(
            f"job {job.id} ({job.task}) is running on {visible(job.locked_by or MISSING)}: "
            "cancel requested; "
            "its worker stops it at its next heartbeat and it ends cancelled"
        )
    else:
        stdout().print(f"job {job.id} ({job.task}) is {job.state.value}")


def jobs_retry_dead(
    queue: Annotated[str | None, typer.Option(help="Only dead jobs of this queue.")] = None,
    task: Annotated[str | None, typer.Option(help="Only dead jobs of this task.")] = None,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Every dead job (of a queue, of a task) back to queued, due now."""
    dsn = resolve_dsn(database_url)

    async def call(conn: AsyncConnection) -> list[int]:
        return await admin.retry_dead_jobs(conn, queue=queue, task=task)

    retried = in_transaction(dsn, call)
    if as_json:
        print_json({"retried": retried})
        return
    what = " ".join(
        part
        for part in (
            f"of queue {queue}" if queue else "",
            f"of task {task}" if task else "",
        )
        if part
    )
    noun = "job" if len(retried) == 1 else "jobs"
    stdout().print(f"retried {len(retried)} dead {noun}{' ' + what if what else ''}")
    if retried:
        stdout().print("ids: " + ", ".join(str(job_id) for job_id in retried))
