"""Reading and repairing jobs: one implementation behind every face (HTTP routes, dashboard,
CLI), so they can never disagree. Everything runs on the caller's SQLAlchemy session or
connection; the functions that change jobs never commit (the caller's transaction decides),
except :func:`prune_finished`, which commits each batch on its own to stay vacuum-friendly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from outbox_worker import metrics, sql
from outbox_worker.enqueue_checks import MAX_CONCURRENCY_KEY_LENGTH, MAX_TAG_LENGTH
from outbox_worker.errors import InvalidRequest, JobNotFound, JobStateConflict
from outbox_worker.jobs import MAX_JOB_ID, Job, JobState
from outbox_worker.names import NAME_PATTERN, is_valid_name

# What every admin read and change runs on: the caller's SQLAlchemy session or connection,
# whose transaction it joins (the HTTP router and dashboard commit it themselves).
AdminSession = AsyncSession | AsyncConnection

MAX_PAGE = 500
FINISHED = (JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED)


@dataclass(frozen=True, slots=True)
class JobPage:
    items: list[Job]
    next_cursor: str | None


@dataclass(slots=True)
class QueueStats:
    queue: str
    depth: dict[str, int] = field(default_factory=dict)
    due: int = 0
    oldest_due_seconds: float = 0.0
    finished_recently: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "depth": self.depth,
            "due": self.due,
            "oldest_due_seconds": round(self.oldest_due_seconds, 3),
            "finished_recently": self.finished_recently,
        }


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    id: str
    queues: list[str]
    concurrency: int
    in_flight: int
    started_at: datetime
    last_seen_at: datetime


# A schedule's next tick overdue by more than this: no running worker fires it.
SCHEDULE_STALE_AFTER_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class ScheduleInfo:
    """A schedule as its row stands: its definition as last declared, its latest tick dealt
    with and that tick's job (its state is None once the job is pruned), its next tick, and
    how overdue that is: a schedule overdue by more than a few seconds is one that no running
    worker fires (taken out of the code, or its workers are down)."""

    name: str
    task: str
    queue: str
    cron: str
    timezone: str
    missed: str
    grace_seconds: float
    args: dict[str, Any]
    last_tick: datetime
    next_tick: datetime
    last_job_id: int | None
    last_job_state: str | None
    declared_at: datetime
    overdue_seconds: float

    @property
    def unfired(self) -> bool:
        return self.overdue_seconds > SCHEDULE_STALE_AFTER_SECONDS

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "queue": self.queue,
            "cron": self.cron,
            "timezone": self.timezone,
            "missed": self.missed,
            "grace_seconds": self.grace_seconds,
            "args": self.args,
            "last_tick": self.last_tick.isoformat(),
            "next_tick": self.next_tick.isoformat(),
            "last_job_id": self.last_job_id,
            "last_job_state": self.last_job_state,
            "declared_at": self.declared_at.isoformat(),
            "overdue_seconds": round(self.overdue_seconds, 3),
        }


def _filter_name(kind: str, value: str | None) -> str | None:
    if value is not None and not is_valid_name(value):
        raise InvalidRequest(f"{kind} {value!r} is not a valid name ({NAME_PATTERN})")
    return value


def _filter_tag(tag: str | None) -> str | None:
    if tag is not None and (not tag or len(tag) > MAX_TAG_LENGTH or "\x00" in tag):
        raise InvalidRequest(f"tag must be 1 to {MAX_TAG_LENGTH} characters")
    return tag


def _filter_concurrency_key(key: str | None) -> str | None:
    if key is not None and (not key or len(key) > MAX_CONCURRENCY_KEY_LENGTH or "\x00" in key):
        raise InvalidRequest(
            f"concurrency_key must be 1 to {MAX_CONCURRENCY_KEY_LENGTH} characters"
        )
    return key


def parse_cursor(cursor: str | None) -> int | None:
    """Cursors are opaque to clients; here they are the last id of the previous page."""
    if cursor is None or cursor == "":
        return None
    # isdigit() alone takes superscripts (which int() refuses) and other scripts' digits;
    # and no id is past bigint.
    if (
        not (cursor.isascii() and cursor.isdigit())
        or len(cursor) > len(str(MAX_JOB_ID))
        or int(cursor) > MAX_JOB_ID
    ):
        raise InvalidRequest(f"cursor {cursor!r} is not one this API handed out")
    return int(cursor)


def _possible(job_id: int) -> bool:
    """Ids are a bigserial: anything else names no job, and must not reach the database,
    which refuses a parameter past bigint with an error rather than an empty answer."""
    return 1 <= job_id <= MAX_JOB_ID


async def get_job(session: AdminSession, job_id: int) -> Job | None:
    if not _possible(job_id):
        return None
    row = (await session.execute(text(sql.JOB_GET), {"id": job_id})).mappings().first()
    return None if row is None else Job.from_row(row)


async def require_job(session: AdminSession, job_id: int) -> Job:
    job = await get_job(session, job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return job


async def list_jobs(
    session: AdminSession,
    *,
    state: str | None = None,
    queue: str | None = None,
    task: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
    tag: str | None = None,
    concurrency_key: str | None = None,
) -> JobPage:
    """Newest first, keyset-paginated: pass ``next_cursor`` back for the next page."""
    if state is not None and state not in set(JobState):
        raise InvalidRequest(f"state {state!r} is not one of {', '.join(JobState)}")
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be from 1 to {MAX_PAGE}")
    params = {
        "state": state,
        "queue": _filter_name("queue", queue),
        "task": _filter_name("task", task),
        "tag": _filter_tag(tag),
        "concurrency_key": _filter_concurrency_key(concurrency_key),
        "before_id": parse_cursor(cursor),
        "limit": limit + 1,
    }
    rows = (await session.execute(text(sql.JOB_LIST), params)).mappings().all()
    items = [Job.from_row(row) for row in rows[:limit]]
    more = len(rows) > limit
    return JobPage(items, str(items[-1].id) if more and items else None)


async def retry_job(session: AdminSession, job_id: int) -> Job:
    """Due now, with at least one more attempt. Refused for running and succeeded jobs."""
    job = await _locked(session, job_id)
    if job.state in (JobState.RUNNING, JobState.SUCCEEDED):
        raise JobStateConflict(
            f"job {job_id} is {job.state}; only queued, dead or cancelled jobs can be retried"
        )
    retry = text(sql.JOB_RETRY)
    params = {"id": job_id, "state": job.state.value}
    if job.active_key is None:
        return Job.from_row((await session.execute(retry, params)).mappings().one())
    try:
        # In a savepoint: the key's unique index may refuse it, and the caller's transaction
        # must survive that to answer 409.
        async with session.begin_nested():
            row = (await session.execute(retry, params)).mappings().one()
    except IntegrityError as exc:
        raise JobStateConflict(
            f"job {job_id}'s key {job.active_key!r} is held by another queued or running "
            f"{job.task!r} job; retry this one once that has finished"
        ) from exc
    return Job.from_row(row)


async def cancel_job(session: AdminSession, job_id: int) -> Job:
    """A queued job is cancelled at once; a running one is asked to stop (its worker ends it
    as cancelled at its next heartbeat). A finished job cannot be cancelled."""
    job = await _locked(session, job_id)
    if job.state in FINISHED:
        raise JobStateConflict(f"job {job_id} is already {job.state}")
    statement = sql.JOB_CANCEL_QUEUED if job.state == JobState.QUEUED else sql.JOB_REQUEST_CANCEL
    row = (await session.execute(text(statement), {"id": job_id})).mappings().one()
    return Job.from_row(row)


async def retry_dead_jobs(
    session: AdminSession,
    *,
    queue: str | None = None,
    task: str | None = None,
    batch: int = 1000,
) -> list[int]:
    """Every dead job matching the filters back to queued; returns their ids."""
    params = {
        "queue": _filter_name("queue", queue),
        "task": _filter_name("task", task),
        "batch": batch,
    }
    retried: list[int] = []
    while True:
        rows = (await session.execute(text(sql.JOB_RETRY_DEAD_MANY), params)).scalars().all()
        retried.extend(rows)
        if len(rows) < batch:
            return retried


async def queue_stats(session: AdminSession, *, window_seconds: float = 300.0) -> list[QueueStats]:
    """Per queue: depth by state, due jobs, age of the oldest due job, and how many jobs
    finished (by state) within the window."""
    stats: dict[str, QueueStats] = {}
    for row in (await session.execute(text(sql.QUEUE_ACTIVE_STATS))).mappings():
        entry = stats.setdefault(row["queue"], QueueStats(row["queue"]))
        entry.depth.update(queued=row["queued"], running=row["running"])
        entry.due = row["due"]
        entry.oldest_due_seconds = row["oldest_due_seconds"]
    finished = await session.execute(text(sql.QUEUE_FINISHED_STATS), {"window": window_seconds})
    for row in finished.mappings():
        entry = stats.setdefault(row["queue"], QueueStats(row["queue"]))
        entry.depth[row["state"]] = row["jobs"]
        entry.finished_recently[row["state"]] = row["recent"]
    for entry in stats.values():
        for state in JobState:
            entry.depth.setdefault(state.value, 0)
        for state in FINISHED:
            entry.finished_recently.setdefault(state.value, 0)
    return sorted(stats.values(), key=lambda entry: entry.queue)


async def list_schedules(session: AdminSession) -> list[ScheduleInfo]:
    rows = await session.execute(text(sql.SCHEDULES_LIST))
    return [ScheduleInfo(**dict(row)) for row in rows.mappings()]


async def workers_alive(session: AdminSession, *, within_seconds: float) -> list[WorkerInfo]:
    rows = await session.execute(text(sql.WORKERS_ALIVE), {"seconds": within_seconds})
    return [WorkerInfo(**dict(row)) for row in rows.mappings()]


async def prune_finished(
    engine: AsyncEngine,
    *,
    older_than: timedelta,
    states: tuple[str, ...] = tuple(FINISHED),
    batch: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Delete finished jobs older than ``older_than``, in batches of their own transaction."""
    for state in states:
        if state not in FINISHED:
            raise InvalidRequest(f"only finished jobs can be pruned, not {state!r}")
    total = 0
    for state in states:
        while True:
            async with engine.begin() as conn:
                result = await conn.execute(
                    text(sql.JOB_PRUNE_FINISHED),
                    {"state": state, "older_than": older_than.total_seconds(), "batch": batch},
                )
            deleted = result.rowcount or 0
            total += deleted
            if progress is not None:
                progress(deleted)
            if deleted < batch:
                break
    return total


async def _locked(session: AdminSession, job_id: int) -> Job:
    if not _possible(job_id):
        raise JobNotFound(f"no job {job_id}")
    row = (await session.execute(text(sql.JOB_GET_FOR_UPDATE), {"id": job_id})).mappings().first()
    if row is None:
        raise JobNotFound(f"no job {job_id}")
    return Job.from_row(row)


async def refresh_gauges(session: AdminSession, *, worker_seen_within: float) -> None:
    """Queue depth, oldest due age, pauses and live workers, for a /metrics scrape: three
    cheap reads."""
    rows = (await session.execute(text(sql.QUEUE_ACTIVE_STATS))).mappings().all()
    metrics.refresh_queue_gauges(rows)
    settings = (await session.execute(text(sql.QUEUE_SETTINGS_LIST))).mappings().all()
    metrics.refresh_pause_gauges(settings)
    alive = await workers_alive(session, within_seconds=worker_seen_within)
    metrics.WORKERS_ALIVE.set(len(alive))
