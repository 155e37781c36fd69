"""``outbox-worker``: the worker and the operator's commands.

The environment becomes settings here and only here; everything below gets plain values.
Errors a user can cause end in one line on stderr and a non-zero exit, never a traceback.

The operator's commands (``jobs``, ``queues``, ``prune``, ``health``) go through
:mod:`outbox_worker.admin`, the one implementation the HTTP routes use too, each in a
transaction of its own on an engine made from ``DATABASE_URL``. ``--json`` prints what the
HTTP routes answer, to stdout, and nothing else. ``migrate`` is
:mod:`outbox_worker.migrate`'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import structlog
import typer
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from typer.exceptions import TyperException

from outbox_worker import admin, db, migrate
from outbox_worker.config import WorkerSettings, parse_duration, sqlalchemy_url
from outbox_worker.db import database_error
from outbox_worker.errors import ConfigError, DatabaseUnavailable, OutboxError
from outbox_worker.jobs import Job, JobState
from outbox_worker.logs import configure_logging
from outbox_worker.names import NAME_PATTERN, is_valid_name
from outbox_worker.registry import Registry
from outbox_worker.worker import Worker, WorkerOptions

T = TypeVar("T")

STATE_STYLES = {
    JobState.QUEUED: "cyan",
    JobState.RUNNING: "yellow",
    JobState.SUCCEEDED: "green",
    JobState.DEAD: "bold red",
    JobState.CANCELLED: "dim",
}

app = typer.Typer(
    name="outbox-worker",
    help="Run pgoutbox workers and look after their queue.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    no_args_is_help=True,
)
jobs_app = typer.Typer(
    name="jobs",
    help="List, show, retry and cancel jobs.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    no_args_is_help=True,
)
app.add_typer(jobs_app, name="jobs")

DatabaseUrl = Annotated[str | None, typer.Option(help="Default: $DATABASE_URL")]
AsJson = Annotated[
    bool, typer.Option("--json", help="Print JSON to stdout (and nothing else) for scripts.")
]
JobId = Annotated[
    int, typer.Argument(metavar="JOB_ID", min=1, max=admin.MAX_JOB_ID, help="Job id.")
]


# ---------------------------------------------------------------------------------------------
# Shared plumbing
# ---------------------------------------------------------------------------------------------


def load_registry(target: str) -> Registry:
    """Import ``package.module:attribute`` and check that it is a Registry."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"expected MODULE:ATTRIBUTE (e.g. app.tasks:registry), got {target!r}")
    if "." not in sys.path and "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, TypeError, ValueError) as exc:  # relative or malformed names too
        raise ConfigError(f"cannot import {module_name!r}: {exc}") from exc
    registry = getattr(module, attribute, None)
    if registry is None:
        raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}")
    if not isinstance(registry, Registry):
        raise ConfigError(f"{target} is a {type(registry).__name__}, not an outbox_worker.Registry")
    return registry


def _queues(value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise typer.BadParameter("give at least one queue name", param_hint="--queues")
    for name in names:
        if not is_valid_name(name):
            raise typer.BadParameter(f"{name!r} must match {NAME_PATTERN}", param_hint="--queues")
    return names


def _duration(value: str, flag: str, *, positive: bool = False) -> timedelta:
    """``--older-than 7d`` and friends; a bad value is a usage error naming the flag."""
    try:
        parsed = parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=flag) from None
    if not isinstance(parsed, timedelta):
        raise typer.BadParameter("give a duration like 30s, 15m, 12h or 7d", param_hint=flag)
    if positive and parsed <= timedelta(0):
        raise typer.BadParameter(f"{value!r} must be longer than zero", param_hint=flag)
    return parsed


def _settings(**overrides: Any) -> WorkerSettings:
    try:
        settings = WorkerSettings()
        data = settings.model_dump() | {k: v for k, v in overrides.items() if v is not None}
        return WorkerSettings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigError(f"invalid {where}: {first['msg']}") from exc


# How long the threads of asyncio.to_thread get to finish once the worker has stopped.
THREADS_GRACE_SECONDS = 1.0


async def _abandon_stuck_handlers(worker: Worker, threads: ThreadPoolExecutor) -> None:
    """Exit at once if handlers are still running: tasks that ignored their cancellation, or
    threads still busy (asyncio.to_thread past a timeout, a thread a handler started).

    Every outcome that could be written is written; the leases of the rest lapse and a
    rescuer takes their jobs back. The interpreter would otherwise wait for those threads at
    exit (and asyncio for those tasks), and a SIGTERM'd worker must not outlive its drain
    timeout by minutes. Idle threads of the pool are no reason: they are let go first, and
    a clean stop then exits normally, exit hooks and all.
    """
    threads.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + THREADS_GRACE_SECONDS
    while True:
        busy = [
            thread
            for thread in threading.enumerate()
            if thread is not threading.current_thread() and not thread.daemon and thread.is_alive()
        ]
        if not busy or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    if busy or worker.stuck:
        worker.log.warning(
            "handlers_abandoned",
            threads=[t.name for t in busy],
            tasks=len(worker.stuck),
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _run_async(main: Callable[[], Coroutine[Any, Any, None]], use_uvloop: bool) -> None:
    loop_factory = None
    if use_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _engine(dsn: str) -> AsyncEngine:
    # NullPool: a command makes one or a few short transactions and exits; nothing to keep.
    return create_async_engine(
        sqlalchemy_url(dsn),
        poolclass=NullPool,
        connect_args={"timeout": db.CONNECT_TIMEOUT_SECONDS},
    )


def _database_url(database_url: str | None) -> str:
    return _settings(database_url=database_url).require_database_url()


def _with_engine(dsn: str, work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Run ``work`` on a fresh engine; connection failures become one-line errors."""

    async def go() -> T:
        engine = _engine(dsn)
        try:
            return await work(engine)
        except OutboxError:
            raise
        except Exception as exc:
            error = database_error(exc, dsn)
            if error is None:
                raise
            raise error from exc
        finally:
            await engine.dispose()

    return asyncio.run(go())


def _with_schema(dsn: str, work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """``_with_engine`` for the commands that read or change jobs, which first refuse, in one
    line naming the command to run, a database whose pgoutbox schema is missing or recorded
    behind this code's: they would fail on a missing table or column, or misread one."""

    async def checked(engine: AsyncEngine) -> T:
        async with engine.connect() as conn:
            state = await conn.run_sync(migrate.state_of)
        if state.status in ("absent", "behind"):
            raise ConfigError(state.summary(db.where(dsn)))
        return await work(engine)

    return _with_engine(dsn, checked)


def _in_transaction(dsn: str, call: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """One admin call inside ``engine.begin()``: it commits when the call returns."""

    async def work(engine: AsyncEngine) -> T:
        async with engine.begin() as conn:
            return await call(conn)

    return _with_schema(dsn, work)


def _stdout() -> Console:
    # markup off: job errors and arguments are shown as written ("[Errno 111]" included).
    return Console(markup=False, highlight=False, soft_wrap=False)


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, default=_json_default, indent=2, ensure_ascii=False))
    sys.stdout.write("\n")


def job_dict(job: Job) -> dict[str, Any]:
    """A job as the HTTP routes answer it: every column, ``state`` as its name."""
    data = dataclasses.asdict(job)
    data.pop("duplicate", None)
    data["state"] = job.state.value
    return data


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _short_when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%m-%d %H:%M:%S")


def _job_when(job: Job) -> datetime | None:
    """The time that matters for the job's state: due, started or finished."""
    if job.state == JobState.QUEUED:
        return job.run_at
    if job.state == JobState.RUNNING:
        return job.started_at
    return job.finished_at


def _age(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{seconds:.1f}s"


def _state(state: JobState) -> Text:
    return Text(state.value, style=STATE_STYLES.get(state, ""))


def _first_line(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    text = _visible(text, lines=True)
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


# What jobs carry (errors, arguments, worker ids) may hold characters a terminal obeys rather
# than shows: escape sequences, C1 controls (\x9b opens one too), a carriage return that
# overwrites the line, bidirectional overrides that reorder it. Shown escaped, as \x1b.
_ESCAPED = {
    code: ascii(chr(code))[1:-1]
    for code in (*range(0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A))
    if chr(code) != "\t"
}
_ESCAPED_BUT_NEWLINES = {code: text for code, text in _ESCAPED.items() if chr(code) != "\n"}


def _visible(text: str, *, lines: bool = False) -> str:
    """``text`` safe for a terminal; ``lines`` keeps its newlines (a traceback's)."""
    return text.translate(_ESCAPED_BUT_NEWLINES if lines else _ESCAPED)


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------


@app.callback()
def _group() -> None:
    """Run pgoutbox workers and look after their queue."""


def start_metrics_server(port: int, host: str) -> Callable[[], None]:
    """Serve prometheus-client's default registry over HTTP; returns the function that
    stops it."""
    from prometheus_client import start_http_server

    try:
        server, thread = start_http_server(port, addr=host)
    except OSError as exc:
        reason = exc.strerror or _one_line(exc) or type(exc).__name__
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {reason}") from exc

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


@app.command()
def run(
    target: Annotated[
        str,
        typer.Argument(
            metavar="MODULE:REGISTRY", help="Where the Registry lives, e.g. app.tasks:registry"
        ),
    ],
    concurrency: Annotated[
        int | None, typer.Option(min=1, max=10_000, help="Jobs run at once.")
    ] = None,
    queues: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated queues (default: every queue "
            "the registry's tasks name, plus default)."
        ),
    ] = None,
    burst: Annotated[bool, typer.Option("--burst", help="Exit 0 once no due job is left.")] = False,
    lease_seconds: Annotated[float | None, typer.Option(min=0.1)] = None,
    poll_interval_seconds: Annotated[float | None, typer.Option(min=0.01)] = None,
    drain_timeout_seconds: Annotated[float | None, typer.Option(min=0)] = None,
    startup_timeout_seconds: Annotated[
        float | None,
        typer.Option(min=0, help="How long to wait at start for a database that does not answer."),
    ] = None,
    listen: Annotated[bool | None, typer.Option("--listen/--no-listen")] = None,
    listen_database_url: Annotated[str | None, typer.Option()] = None,
    database_url: DatabaseUrl = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            envvar="OUTBOX_METRICS_PORT",
            help="Serve Prometheus metrics on this port (off by default).",
        ),
    ] = None,
    metrics_host: Annotated[
        str,
        typer.Option(
            envvar="OUTBOX_METRICS_HOST",
            help="Address the metrics server binds (0.0.0.0 for every interface).",
        ),
    ] = "127.0.0.1",
) -> None:
    """Claim and run jobs until SIGTERM/SIGINT (drains in-flight jobs, then exits 0)."""
    queue_names = _queues(queues)
    settings = _settings(
        database_url=database_url,
        concurrency=concurrency,
        lease_seconds=lease_seconds,
        poll_interval_seconds=poll_interval_seconds,
        drain_timeout_seconds=drain_timeout_seconds,
        startup_timeout_seconds=startup_timeout_seconds,
        listen=listen,
        listen_database_url=listen_database_url,
    )
    dsn = settings.require_database_url()
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    registry = load_registry(target)
    options = WorkerOptions(
        dsn=dsn,
        queues=queue_names,
        concurrency=settings.concurrency,
        lease_seconds=settings.lease_seconds,
        poll_interval=settings.poll_interval_seconds,
        drain_timeout=settings.drain_timeout_seconds,
        listen=settings.listen,
        listen_dsn=settings.listen_database_url,
        burst=burst,
        pool_size=settings.pool_size,
        prepared_statements=settings.prepared_statements,
        retry_base=settings.retry_base_seconds,
        retry_cap=settings.retry_cap_seconds,
        startup_timeout=settings.startup_timeout_seconds,
        retention={
            "succeeded": settings.retention_succeeded,
            "cancelled": settings.retention_cancelled,
            "dead": settings.retention_dead,
        },
    )
    stop_metrics: Callable[[], None] | None = None
    if metrics_port is not None:
        # Before the worker starts, so a scrape sees the worker from its first claim on.
        stop_metrics = start_metrics_server(metrics_port, metrics_host)
        structlog.get_logger("outbox_worker").info(
            "metrics_serving", host=metrics_host, port=metrics_port, path="/metrics"
        )

    async def main() -> None:
        worker = Worker(registry, options)
        loop = asyncio.get_running_loop()
        # asyncio.to_thread's pool, held here so that the stop can let its idle threads go.
        threads = ThreadPoolExecutor(thread_name_prefix="outbox-handler")
        loop.set_default_executor(threads)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()
        await _abandon_stuck_handlers(worker, threads)

    try:
        _run_async(main, settings.uvloop)
    finally:
        if stop_metrics is not None:
            stop_metrics()


# ---------------------------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------------------------


@jobs_app.command("list")
def jobs_list(
    state: Annotated[
        str | None, typer.Option(help=f"Only jobs in this state ({', '.join(JobState)}).")
    ] = None,
    queue: Annotated[str | None, typer.Option(help="Only jobs of this queue.")] = None,
    task: Annotated[str | None, typer.Option(help="Only jobs of this task.")] = None,
    limit: Annotated[int, typer.Option(help=f"Jobs per page (1 to {admin.MAX_PAGE}).")] = 50,
    cursor: Annotated[
        str | None, typer.Option(help="Where the previous page ended (its next cursor).")
    ] = None,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Jobs, newest first, a page at a time (pass the printed next cursor for the next page).

    WHEN is when a queued job is due, a running one started, a finished one finished."""
    dsn = _database_url(database_url)

    async def call(conn: AsyncConnection) -> admin.JobPage:
        return await admin.list_jobs(
            conn, state=state, queue=queue, task=task, limit=limit, cursor=cursor
        )

    page = _in_transaction(dsn, call)
    if as_json:
        _print_json(
            {"items": [job_dict(job) for job in page.items], "next_cursor": page.next_cursor}
        )
        return
    console = _stdout()
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
            _state(job.state),
            f"{job.attempts}/{job.max_attempts}",
            _short_when(_job_when(job)),
            _first_line(job.last_error, width=40),
        )
    console.print(table)
    if page.next_cursor is not None:
        console.print(f"next cursor: {page.next_cursor}  (--cursor {page.next_cursor})")
    else:
        console.print("next cursor: none (last page)")


def _print_job(job: Job) -> None:
    console = _stdout()
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("id", str(job.id))
    table.add_row("task", job.task)
    table.add_row("queue", job.queue)
    table.add_row("state", _state(job.state))
    table.add_row("attempts", f"{job.attempts} of {job.max_attempts}")
    table.add_row("priority", str(job.priority))
    table.add_row("args", _visible(json.dumps(job.args, indent=2, ensure_ascii=False), lines=True))
    if job.result is not None:
        result = json.dumps(job.result, indent=2, ensure_ascii=False)
        table.add_row("result", _visible(result, lines=True))
    table.add_row("last error", _visible(job.last_error or "-", lines=True))
    table.add_row("dedupe key", _visible(job.dedupe_key or "-"))
    table.add_row("correlation id", _visible(job.correlation_id or "-"))
    table.add_row("locked by", _visible(job.locked_by or "-"))
    table.add_row("locked until", _when(job.locked_until))
    table.add_row("run at", _when(job.run_at))
    table.add_row("created at", _when(job.created_at))
    table.add_row("started at", _when(job.started_at))
    table.add_row("finished at", _when(job.finished_at))
    if job.cancel_requested_at is not None:
        table.add_row("cancel requested", _when(job.cancel_requested_at))
    console.print(table)


@jobs_app.command("show")
def jobs_show(job_id: JobId, as_json: AsJson = False, database_url: DatabaseUrl = None) -> None:
    """One job: its arguments, attempts, last error and result. Times are UTC."""
    dsn = _database_url(database_url)

    async def call(conn: AsyncConnection) -> Job:
        return await admin.require_job(conn, job_id)

    job = _in_transaction(dsn, call)
    if as_json:
        _print_json(job_dict(job))
    else:
        _print_job(job)


@jobs_app.command("retry")
def jobs_retry(job_id: JobId, as_json: AsJson = False, database_url: DatabaseUrl = None) -> None:
    """Queue a dead, cancelled or queued job to run now, with at least one more attempt."""
    dsn = _database_url(database_url)

    async def call(conn: AsyncConnection) -> Job:
        return await admin.retry_job(conn, job_id)

    job = _in_transaction(dsn, call)
    if as_json:
        _print_json(job_dict(job))
        return
    _stdout().print(
        f"job {job.id} ({job.task}) is {job.state.value}: due now, "
        f"attempt {job.attempts + 1} of {job.max_attempts} next"
    )


@jobs_app.command("cancel")
def jobs_cancel(job_id: JobId, as_json: AsJson = False, database_url: DatabaseUrl = None) -> None:
    """Cancel a queued job at once, or ask a running job's worker to stop it."""
    dsn = _database_url(database_url)

    async def call(conn: AsyncConnection) -> Job:
        return await admin.cancel_job(conn, job_id)

    job = _in_transaction(dsn, call)
    if as_json:
        _print_json(job_dict(job))
        return
    if job.state == JobState.RUNNING:
        _stdout().print(
            f"job {job.id} ({job.task}) is running on {_visible(job.locked_by or '-')}: "
            "cancel requested; "
            "its worker stops it at its next heartbeat and it ends cancelled"
        )
    else:
        _stdout().print(f"job {job.id} ({job.task}) is {job.state.value}")


@jobs_app.command("retry-dead")
def jobs_retry_dead(
    queue: Annotated[str | None, typer.Option(help="Only dead jobs of this queue.")] = None,
    task: Annotated[str | None, typer.Option(help="Only dead jobs of this task.")] = None,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Every dead job (of a queue, of a task) back to queued, due now."""
    dsn = _database_url(database_url)

    async def call(conn: AsyncConnection) -> list[int]:
        return await admin.retry_dead_jobs(conn, queue=queue, task=task)

    retried = _in_transaction(dsn, call)
    if as_json:
        _print_json({"retried": retried})
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
    _stdout().print(f"retried {len(retried)} dead {noun}{' ' + what if what else ''}")
    if retried:
        _stdout().print("ids: " + ", ".join(str(job_id) for job_id in retried))


# ---------------------------------------------------------------------------------------------
# queues, prune
# ---------------------------------------------------------------------------------------------


@app.command()
def queues(
    window: Annotated[
        str, typer.Option(help="Count jobs finished within this long (e.g. 5m, 1h).")
    ] = "5m",
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Per queue: jobs by state, due now, age of the oldest due job, finished recently."""
    window_seconds = _duration(window, "--window", positive=True).total_seconds()
    dsn = _database_url(database_url)

    async def call(conn: AsyncConnection) -> list[admin.QueueStats]:
        return await admin.queue_stats(conn, window_seconds=window_seconds)

    stats = _in_transaction(dsn, call)
    if as_json:
        _print_json(
            {"queues": [entry.as_dict() for entry in stats], "window_seconds": window_seconds}
        )
        return
    console = _stdout()
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
        table.add_row(
            entry.queue,
            str(entry.depth.get(JobState.QUEUED, 0)),
            str(entry.due),
            str(entry.depth.get(JobState.RUNNING, 0)),
            _age(entry.oldest_due_seconds),
            *(
                f"{entry.depth.get(state, 0)} (+{entry.finished_recently.get(state, 0)})"
                for state in admin.FINISHED
            ),
        )
    console.print(table)


def _finished_states(value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    if not names:
        raise typer.BadParameter("give at least one state", param_hint="--state")
    for name in names:
        if name not in admin.FINISHED:
            raise typer.BadParameter(
                f"only finished jobs can be pruned ({', '.join(admin.FINISHED)}), not {name!r}",
                param_hint="--state",
            )
    return names


@app.command()
def prune(
    older_than: Annotated[
        str,
        typer.Option(help="Delete jobs that finished longer ago than this (e.g. 7d, 12h, 30m)."),
    ],
    state: Annotated[
        str, typer.Option(help="Comma-separated finished states to prune.")
    ] = "succeeded,dead,cancelled",
    batch: Annotated[int, typer.Option(min=1, max=100_000, help="Rows per transaction.")] = 1000,
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Delete finished jobs older than a duration, a batch per transaction."""
    age = _duration(older_than, "--older-than")
    states = _finished_states(state)
    dsn = _database_url(database_url)

    if as_json:

        async def quiet(engine: AsyncEngine) -> int:
            return await admin.prune_finished(
                engine, older_than=age, states=states, batch=batch, progress=None
            )

        deleted = _with_schema(dsn, quiet)
        _print_json(
            {
                "deleted": deleted,
                "older_than_seconds": age.total_seconds(),
                "states": list(states),
            }
        )
        return

    # The bar goes to stderr, so stdout keeps only the summary.
    progress = Progress(
        SpinnerColumn(),
        TextColumn("pruning {task.fields[states]}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f} deleted"),
        TimeElapsedColumn(),
        console=Console(stderr=True, markup=False, highlight=False),
        transient=False,
    )

    async def with_bar(engine: AsyncEngine) -> int:
        # _with_schema has connected before the bar is drawn: an unreachable database is
        # one error line.
        with progress:
            bar = progress.add_task("prune", total=None, states=",".join(states))

            def advance(deleted: int) -> None:
                progress.advance(bar, deleted)

            total = await admin.prune_finished(
                engine, older_than=age, states=states, batch=batch, progress=advance
            )
            progress.update(bar, total=max(total, 1), completed=max(total, 1))
            return total

    deleted = _with_schema(dsn, with_bar)
    noun = "job" if deleted == 1 else "jobs"
    _stdout().print(
        f"deleted {deleted} finished {noun} ({', '.join(states)}) older than {older_than}"
    )


# ---------------------------------------------------------------------------------------------
# health
# ---------------------------------------------------------------------------------------------


def expected_heads(ini: Path) -> list[str] | None:
    """The migration heads of the Alembic scripts that ``ini`` names; None without the file."""
    if not ini.is_file():
        return None
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    try:
        return sorted(ScriptDirectory.from_config(Config(str(ini))).get_heads())
    except Exception as exc:
        raise ConfigError(f"cannot read the migrations of {ini}: {_one_line(exc)}") from exc


def _current_heads(sync_conn: Connection) -> list[str]:
    from alembic.runtime.migration import MigrationContext

    return sorted(MigrationContext.configure(sync_conn).get_current_heads())


# How health rates each state of the pgoutbox schema: "ahead" is a newer pgoutbox's schema,
# which this version's workers serve (rolling deploys); "unrecorded", tables whose revision
# no bookkeeping names, which they serve as they are.
_SCHEMA_HEALTH = {
    "head": "ok",
    "ahead": "ok",
    "unrecorded": "unknown",
    "behind": "failing",
    "absent": "failing",
}


async def _health(
    engine: AsyncEngine, dsn: str, *, within: float, heads: list[str] | None, ini: Path
) -> dict[str, Any]:
    where = db.where(dsn)
    database: dict[str, Any] = {"status": "ok", "at": where}
    schema: dict[str, Any] = {"status": "unknown", "current": None, "expected": migrate.head()}
    migrations: dict[str, Any] = {"status": "unknown", "current": None, "expected": heads}
    workers: dict[str, Any] = {"status": "unknown", "alive": 0, "within_seconds": within}
    try:
        async with engine.connect() as conn:
            state = await conn.run_sync(migrate.state_of)
            schema["current"] = state.revision
            schema["recorded_in"] = {"own": migrate.VERSION_TABLE, "app": "alembic_version"}.get(
                state.route or ""
            )
            schema["status"] = _SCHEMA_HEALTH[state.status]
            if state.status != "head":
                schema["detail"] = state.summary(where)
            current = await conn.run_sync(_current_heads)
            migrations["current"] = current
            if heads is None:
                migrations["detail"] = f"no {ini} to compare with"
            elif current == heads:
                migrations["status"] = "ok"
            else:
                migrations["status"] = "failing"
                migrations["detail"] = f"database at {current or 'no revision'}, scripts at {heads}"
            try:
                alive = await admin.workers_alive(conn, within_seconds=within)
            except Exception as exc:
                if not isinstance(database_error(exc, dsn), ConfigError):
                    raise
                workers["detail"] = "no outbox_workers table: run `outbox-worker migrate`"
                workers["status"] = "failing"
            else:
                workers["alive"] = len(alive)
                workers["workers"] = [
                    {"id": w.id, "queues": w.queues, "last_seen_at": w.last_seen_at} for w in alive
                ]
                workers["status"] = "ok" if alive else "failing"
                if not alive:
                    workers["detail"] = f"no worker heartbeat within {within:g}s"
    except Exception as exc:
        error = database_error(exc, dsn)
        if not isinstance(error, DatabaseUnavailable):
            raise
        database = {"status": "failing", "at": db.where(dsn), "detail": str(error)}
    healthy = (
        database["status"] == "ok"
        and schema["status"] != "failing"
        and migrations["status"] != "failing"
        and workers["status"] == "ok"
    )
    return {
        "status": "healthy" if healthy else "unhealthy",
        "checks": {
            "database": database,
            "schema": schema,
            "migrations": migrations,
            "workers": workers,
        },
    }


@app.command()
def health(
    within: Annotated[
        str, typer.Option(help="A worker counts as alive if its heartbeat is this recent.")
    ] = "60s",
    alembic_ini: Annotated[
        Path,
        typer.Option(
            help="The project's alembic.ini, to compare the database with its migration heads "
            "too (migrations is 'unknown' when the file is not there)."
        ),
    ] = Path("alembic.ini"),
    as_json: AsJson = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Database reachable, pgoutbox's schema at this version's head (and the project's
    migrations at theirs), a worker heartbeat seen recently. Exits 0 when healthy, 1 when
    not."""
    within_seconds = _duration(within, "--within", positive=True).total_seconds()
    heads = expected_heads(alembic_ini)
    dsn = _database_url(database_url)

    async def work(engine: AsyncEngine) -> dict[str, Any]:
        return await _health(engine, dsn, within=within_seconds, heads=heads, ini=alembic_ini)

    report = _with_engine(dsn, work)
    if as_json:
        _print_json(report)
    else:
        _print_health(report)
    if report["status"] != "healthy":
        raise typer.Exit(1)


def _print_health(report: dict[str, Any]) -> None:
    console = _stdout()
    checks = report["checks"]
    styles = {"ok": "green", "failing": "bold red", "unknown": "yellow"}
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    database = checks["database"]
    table.add_row(
        "database",
        Text(database["status"], style=styles[database["status"]]),
        _visible(database.get("detail", database["at"])),
    )
    schema = checks["schema"]
    schema_detail = schema.get("detail") or f"at {schema['current']}"
    table.add_row(
        "schema", Text(schema["status"], style=styles[schema["status"]]), _visible(schema_detail)
    )
    migrations = checks["migrations"]
    if migrations["status"] == "ok":
        migrations_detail = f"at {', '.join(migrations['current'])}"
    else:
        migrations_detail = migrations.get("detail", "not checked")
        if migrations["current"] is not None and migrations["status"] == "unknown":
            current = ", ".join(migrations["current"]) or "no revision"
            migrations_detail += f" (database at {current})"
    table.add_row(
        "migrations",
        Text(migrations["status"], style=styles[migrations["status"]]),
        _visible(migrations_detail),
    )
    workers = checks["workers"]
    if workers["status"] == "ok":
        ids = ", ".join(worker["id"] for worker in workers["workers"])
        workers_detail = f"{workers['alive']} alive within {workers['within_seconds']:g}s: {ids}"
    else:
        workers_detail = workers.get("detail", "not checked")
    table.add_row(
        "workers",
        Text(workers["status"], style=styles[workers["status"]]),
        _visible(workers_detail),
    )
    console.print(table)
    status = report["status"]
    console.print(Text(status, style="bold green" if status == "healthy" else "bold red"))


# ---------------------------------------------------------------------------------------------
# migrate
# ---------------------------------------------------------------------------------------------


@app.command("migrate")
def migrate_schema(
    sql: Annotated[
        bool,
        typer.Option(
            "--sql",
            help="Print the SQL that brings an empty database to head (bookkeeping included) "
            "instead of running it; needs no database.",
        ),
    ] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Change nothing: exit 0 if the schema is at head, 1 with the command to run "
            "if not.",
        ),
    ] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Bring pgoutbox's tables to this version's head, recorded in pgoutbox_alembic_version
    (never in your alembic_version). Running it again, or from two deploys at once, is safe."""
    if sql and check:
        raise typer.BadParameter("give --sql or --check, not both", param_hint="--sql")
    if sql:
        migrate.offline_sql()
        return
    dsn = _database_url(database_url)
    where = db.where(dsn)
    if check:
        state = _with_engine(dsn, migrate.check)
        if state.status != "head":
            raise migrate.SchemaNotAtHead(state.summary(where))
        print(_visible(state.summary(where)))
        return
    applied = _with_engine(dsn, lambda engine: migrate.upgrade(engine, where))
    # Plain lines, unwrapped: deploy logs keep each one whole.
    for revision in applied:
        print(f"applied {revision}: {migrate.describe(revision)}")
    done = "" if applied else ": nothing to do"
    print(_visible(f"the pgoutbox schema at {where} is at {migrate.head()} (head){done}"))


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: one-line errors, exit 2 for usage, 1 for the rest."""
    command = typer.main.get_command(app)
    try:
        code = command.main(
            args=list(argv) if argv is not None else None,
            prog_name="outbox-worker",
            standalone_mode=False,
        )
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except (typer.Abort, KeyboardInterrupt):
        raise SystemExit(130) from None
    except TyperException as exc:  # usage errors: bad flags, missing arguments
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help, unprefixed
            print(exc.format_message(), file=sys.stderr)
        else:
            message = _visible(_one_line(exc.format_message()))
            print(f"outbox-worker: error: {message}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except OutboxError as exc:
        print(f"outbox-worker: error: {_visible(_one_line(exc))}", file=sys.stderr)
        raise SystemExit(2 if isinstance(exc, ConfigError) else 1) from None
    raise SystemExit(code if isinstance(code, int) else 0)
