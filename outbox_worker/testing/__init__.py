"""Helpers for testing an app that uses pgoutbox, against the PostgreSQL it really uses.

- :func:`assert_enqueued` and :func:`refute_enqueued`: what the code under test enqueued, read
  through the test's own session or connection, so an uncommitted transaction counts too.
- :func:`drain`: run the due jobs in this process as a worker would: claimed, run by the
  worker's Executor, and their outcomes written by the worker's fenced statements.
- :func:`perform_job`: call one handler with a real JobContext and no job row, to unit-test it.
- :func:`clear_jobs`: an empty queue for the next test.

The helpers that read or clear the table take every async session or connection enqueue
takes; ``outbox_worker.testing.sync`` has their twins for a sync session, and a sync
``drain`` and ``perform_job``, for a sync test suite. Each of them is a plan, as an enqueue
is (outbox_worker.enqueue), run by outbox_worker.drivers: one search and one failure message
whatever the session. docs/testing.md shows them in a FastAPI app's tests.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
from collections.abc import AsyncIterator, Coroutine, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg
import structlog

from outbox_worker import db, drivers, sql
from outbox_worker._worker.backoff import retry_delay
from outbox_worker._worker.claims import ClaimedJob
from outbox_worker._worker.executor import Executor
from outbox_worker._worker.outcomes import Failed, Outcome, Settled, Succeeded
from outbox_worker.client import AsyncSessionLike
from outbox_worker.config import WorkerSettings, asyncpg_dsn
from outbox_worker.context import JobContext, current_correlation_id
from outbox_worker.enqueue import Plan, _default_max_args_bytes, _encode_args
from outbox_worker.errors import InvalidArgs, OutboxError, UnknownTask, WrongSession
from outbox_worker.jobs import JOB_COLUMNS, Job, JobState
from outbox_worker.registry import Registry
from outbox_worker.worker import new_worker_id

__all__ = [
    "DrainResult",
    "assert_enqueued",
    "clear_jobs",
    "drain",
    "perform_job",
    "refute_enqueued",
]

# No heartbeat extends a drain's leases, so each is long enough for any handler a test runs.
# Should the test process die mid-drain, a worker's rescuer takes the job back once it lapses.
DRAIN_LEASE_SECONDS = 600.0
# How many jobs a failed assertion lists (the newest), so that a full table stays readable.
SHOWN_JOBS = 20

# Where JOB_FAIL_MANY leaves a job (its state) → the DrainResult field that counts it.
_FAILED_ENDS = {"queued": "retried", "dead": "dead", "cancelled": "cancelled"}


# ---------------------------------------------------------------------------------------------
# What was enqueued
# ---------------------------------------------------------------------------------------------


def assert_enqueued(
    session: AsyncSessionLike,
    task: str,
    args: Mapping[str, Any] | None = None,
    *,
    count: int | None = None,
    queue: str | None = None,
    state: JobState | str | None = None,
    priority: int | None = None,
    max_attempts: int | None = None,
    key: str | None = None,
    correlation_id: str | None = None,
) -> Coroutine[Any, Any, list[Job]]:
    """The jobs of ``task`` that match, oldest first; AssertionError if there is none (or,
    with ``count``, not exactly that many), listing the jobs there are. Awaited.

    ``args`` matches when the job's args contain it (jsonb ``@>``: ``{"user_id": 1}`` matches
    ``{"user_id": 1, "lang": "en"}``). Every other filter is a column, compared for equality
    (``key`` is ``dedupe_key``); one left at None matches anything. Any state matches unless
    ``state`` is given. Read through ``session``, any async session or connection enqueue
    takes, in its transaction: the jobs that transaction enqueued count before they are
    committed. A sync session (WrongSession: see outbox_worker.testing.sync) or a state that
    does not exist (ValueError) is refused by the call itself, awaited or not.
    """
    runner = _async_runner(session, "assert_enqueued")
    search = _search(
        task,
        args,
        queue=queue,
        state=state,
        priority=priority,
        max_attempts=max_attempts,
        key=key,
        correlation_id=correlation_id,
    )
    return runner(session, _expect(search, count))


def refute_enqueued(
    session: AsyncSessionLike,
    task: str,
    args: Mapping[str, Any] | None = None,
    *,
    queue: str | None = None,
    state: JobState | str | None = None,
    priority: int | None = None,
    max_attempts: int | None = None,
    key: str | None = None,
    correlation_id: str | None = None,
) -> Coroutine[Any, Any, None]:
    """AssertionError, listing the matches, if any job matches; the session and filters are
    those of :func:`assert_enqueued`. Awaited."""
    runner = _async_runner(session, "refute_enqueued")
    search = _search(
        task,
        args,
        queue=queue,
        state=state,
        priority=priority,
        max_attempts=max_attempts,
        key=key,
        correlation_id=correlation_id,
    )
    return runner(session, _refute(search))


def clear_jobs(session: AsyncSessionLike) -> Coroutine[Any, Any, int]:
    """Delete every job, in the session's transaction (it never commits); returns how many.
    Awaited.

    For a clean queue per test when the tests share a database (see docs/testing.md). On a
    raw connection outside a transaction the DELETE is a transaction of its own, committed
    at once as every statement there is: what a fixture emptying the table wants."""
    return _async_runner(session, "clear_jobs")(session, _clear())


def _async_runner(session: object, function: str) -> drivers.AsyncRunner:
    runner = drivers.async_runner_unchecked(session)
    if runner is None:
        raise WrongSession(_refusal(session, function, sync=False))
    return runner


def _refusal(session: object, function: str, *, sync: bool) -> str:
    """Why ``function`` (this module's, or its sync twin's) cannot use ``session``, and what
    to call instead."""
    kind = drivers._name(session)
    if sync and drivers.async_runner_unchecked(session) is not None:
        return (
            f"outbox_worker.testing.sync.{function}() takes a sync session or connection, and "
            f"this is an async {kind}: call `await outbox_worker.testing.{function}(...)`"
        )
    if not sync and drivers.sync_runner_unchecked(session) is not None:
        return (
            f"outbox_worker.testing.{function}() takes an async session or connection, and "
            f"this is a sync {kind}: call outbox_worker.testing.sync.{function}(), which is "
            "not awaited"
        )
    called = f"outbox_worker.testing.{'sync.' if sync else ''}{function}()"
    return (
        f"{called} cannot use {kind}: pass the session or connection whose transaction the "
        "jobs are in: SQLAlchemy's AsyncSession or AsyncConnection, an asyncpg connection or "
        f"a psycopg AsyncConnection to outbox_worker.testing.{function}(); SQLAlchemy's "
        "Session or Connection (psycopg or psycopg2) or a psycopg Connection to "
        f"outbox_worker.testing.sync.{function}()"
    )


# The plans: what assert_enqueued, refute_enqueued and clear_jobs do, the same whatever
# session runs them, here or in outbox_worker.testing.sync. Rows come back as sequences of
# columns, sql.JOB_SELECT_LIST's in JOB_COLUMNS' order.


class _Search(NamedTuple):
    """JOB_FIND's parameters, and the search in words for a failure message."""

    params: dict[str, Any]
    wanted: str


def _search(
    task: str,
    args: Mapping[str, Any] | None,
    *,
    queue: str | None,
    state: JobState | str | None,
    priority: int | None,
    max_attempts: int | None,
    key: str | None,
    correlation_id: str | None,
) -> _Search:
    """The search, built when the helper is called: a state that does not exist raises
    ValueError there, before any SQL."""
    params = {
        "task": task,
        "args": None if args is None else json.dumps(dict(args)),
        "queue": queue,
        "state": None if state is None else JobState(state).value,
        "priority": priority,
        "max_attempts": max_attempts,
        "dedupe_key": key,
        "correlation_id": correlation_id,
    }
    wanted = f"of task {task!r}"
    if args is not None:
        wanted += f" with args containing {_json(args)}"
    for name, value in params.items():
        if name not in ("task", "args") and value is not None:
            wanted += f", {'key' if name == 'dedupe_key' else name}={value!r}"
    return _Search(params, wanted)


def _expect(search: _Search, count: int | None) -> Plan[list[Job]]:
    found = yield from _find(search)
    if (count is None and not found) or (count is not None and len(found) != count):
        expected = "a job" if count is None else f"{count} job{'' if count == 1 else 's'}"
        enqueued = yield from _what_is_enqueued()
        raise AssertionError(f"expected {expected} {search.wanted}, found {len(found)}\n{enqueued}")
    return found


def _refute(search: _Search) -> Plan[None]:
    found = yield from _find(search)
    if found:
        raise AssertionError(
            f"expected no job {search.wanted}, found {len(found)}:\n"
            + "\n".join(_describe(job) for job in found)
        )


def _clear() -> Plan[int]:
    rows = yield sql.JOB_DELETE_ALL, {}
    deleted: int = rows[0][0]
    return deleted


def _find(search: _Search) -> Plan[list[Job]]:
    rows = yield sql.JOB_FIND, search.params
    return [_job(row) for row in rows]


def _what_is_enqueued() -> Plan[str]:
    rows = yield sql.JOB_LIST_NEWEST, {"limit": SHOWN_JOBS + 1}
    if not rows:
        return "outbox_jobs is empty (as this session sees it)"
    more = f", the newest {SHOWN_JOBS} shown" if len(rows) > SHOWN_JOBS else ""
    lines = [_describe(_job(row)) for row in reversed(rows[:SHOWN_JOBS])]
    return f"outbox_jobs holds (as this session sees it{more}):\n" + "\n".join(lines)


def _job(row: Sequence[Any]) -> Job:
    return Job.from_row(dict(zip(JOB_COLUMNS, row, strict=True)))


def _describe(job: Job) -> str:
    details = [
        f"queue={job.queue}",
        f"state={job.state}",
        f"attempts={job.attempts}/{job.max_attempts}",
        f"args={_json(job.args)}",
    ]
    if job.priority:
        details.append(f"priority={job.priority}")
    if job.dedupe_key is not None:
        details.append(f"key={job.dedupe_key!r}")
    if job.correlation_id is not None:
        details.append(f"correlation_id={job.correlation_id!r}")
    return f"  #{job.id} {job.task} " + " ".join(details)


def _json(value: Any) -> str:
    shown = json.dumps(value, sort_keys=True, ensure_ascii=False, default=repr)
    return shown if len(shown) <= 200 else shown[:199] + "…"


# ---------------------------------------------------------------------------------------------
# Running jobs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DrainResult:
    """How each attempt a drain ran ended, and the jobs it ran, in order (a job twice if its
    retry fell due during the drain)."""

    succeeded: int = 0
    # Failed, with attempts left: queued again after its backoff.
    retried: int = 0
    # Failed its last attempt, or could never run (unknown task, args that do not fit).
    dead: int = 0
    # Failed after an operator asked to cancel it.
    cancelled: int = 0
    # Its outcome was not written: the row was no longer the drain's (the worker's fence).
    lost: int = 0
    job_ids: tuple[int, ...] = ()

    @property
    def ran(self) -> int:
        return len(self.job_ids)


async def drain(
    registry: Registry,
    database: str | asyncpg.Pool,
    *,
    queues: Iterable[str] | None = None,
    limit: int | None = None,
) -> DrainResult:
    """Run every due job of ``queues`` (by default the registry's, as ``outbox-worker run``
    serves) in this process, one at a time in the order a worker claims them, until none is
    due; at most ``limit`` attempts when given.

    Each job is claimed, run and written as a worker would: the worker's claim, its Executor
    (timeouts, ``ctx.transaction()``, unknown tasks and misfit args go dead), and its fenced
    outcome statements. A failed attempt is queued again after the worker's backoff
    (OUTBOX_RETRY_BASE_SECONDS: half a second to a second after a first failure, by
    default), so it is not due yet and the drain ends rather than retry it at once. Jobs the
    drained jobs enqueue (and commit) are due too, and drained in the same call: ``limit``
    bounds a chain that keeps enqueueing.

    ``database`` is the app's database URL (a pool is opened and closed here) or an asyncpg
    pool. The drain sees committed jobs only: commit (or finish the request) first.
    """
    if isinstance(queues, str):
        raise TypeError(f"queues is a list of names, e.g. queues=[{queues!r}]")
    if limit is not None and limit < 0:
        raise ValueError("limit must be 0 or more")
    served = list(registry.queues() if queues is None else queues)
    settings = WorkerSettings()
    worker_id = new_worker_id("drain")
    async with _pool(database) as pool:
        executor = Executor(
            registry=registry,
            worker_id=worker_id,
            pool=pool,
            retry_delay=functools.partial(
                retry_delay, base=settings.retry_base_seconds, cap=settings.retry_cap_seconds
            ),
            # Nothing stops a drained handler: no operator cancel is heard (there is no
            # heartbeat), and the drain has no shutdown of its own.
            stop_reason=lambda job_id: None,
            log=structlog.get_logger("outbox_worker").bind(worker_id=worker_id),
        )
        ends: collections.Counter[str] = collections.Counter()
        ran: list[int] = []
        while limit is None or len(ran) < limit:
            claimed = await pool.fetch(
                *sql.bind(
                    sql.JOB_CLAIM,
                    queues=served,
                    limit=1,
                    worker_id=worker_id,
                    lease_seconds=DRAIN_LEASE_SECONDS,
                )
            )
            if not claimed:
                break
            row = claimed[0]
            job = ClaimedJob(
                id=row["id"],
                task=row["task"],
                queue=row["queue"],
                args=row["args"],
                attempt=row["attempts"],
                max_attempts=row["max_attempts"],
                correlation_id=row["correlation_id"],
            )
            # A task of its own, as the worker runs each job: the correlation id and log
            # fields the Executor binds stay out of the caller's context.
            outcome = await asyncio.create_task(executor.run(job))
            ends[await _write(pool, worker_id, outcome)] += 1
            ran.append(job.id)
    return DrainResult(
        succeeded=ends["succeeded"],
        retried=ends["retried"],
        dead=ends["dead"],
        cancelled=ends["cancelled"],
        lost=ends["lost"],
        job_ids=tuple(ran),
    )


@asynccontextmanager
async def _pool(database: str | asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    if not isinstance(database, str):
        yield database
        return
    pool = await db.create_pool(asyncpg_dsn(database), size=4, prepared_statements=True)
    try:
        yield pool
    finally:
        await pool.close()


async def _write(pool: asyncpg.Pool, worker_id: str, outcome: Outcome) -> str:
    """Write one outcome with the statement the worker's Completer uses for it; returns the
    DrainResult field it counts in."""
    if isinstance(outcome, Succeeded):
        done = await pool.fetch(
            *sql.bind(
                sql.JOB_COMPLETE_MANY,
                ids=[outcome.job_id],
                attempts=[outcome.attempt],
                results=[outcome.result],
                worker_id=worker_id,
            )
        )
        return "succeeded" if done else "lost"
    if isinstance(outcome, Failed):
        failed = await pool.fetch(
            *sql.bind(
                sql.JOB_FAIL_MANY,
                ids=[outcome.job_id],
                attempts=[outcome.attempt],
                errors=[outcome.error],
                delays=[outcome.delay],
                give_up=[outcome.give_up],
                worker_id=worker_id,
            )
        )
        return _FAILED_ENDS[failed[0]["state"]] if failed else "lost"
    if isinstance(outcome, Settled):
        # Completed in its own transaction (ctx.transaction()), or its lease was lost: the
        # row says which.
        row = await pool.fetchrow(*sql.bind(sql.JOB_GET_PG, id=outcome.job_id))
        finished = row is not None and row["state"] == JobState.SUCCEEDED
        return "succeeded" if finished else "lost"
    raise AssertionError(f"a drain never stops a handler, yet its attempt ended as {outcome}")


async def perform_job(
    registry: Registry,
    task: str,
    args: Mapping[str, Any] | None = None,
    *,
    database: str | asyncpg.Pool | asyncpg.Connection | None = None,
    job_id: int = 0,
    attempt: int = 1,
    correlation_id: str | None = None,
) -> Any:
    """Call ``task``'s handler once, as a worker would, with no job row; returns what it
    returns and raises what it raises.

    The args go through JSON as enqueued ones do (a tuple arrives as a list; what enqueue
    refuses is refused here, with its errors) and must fit the handler (else InvalidArgs);
    the task's timeout applies. The handler gets a real JobContext (``ctx.job_id`` is
    ``job_id``, 0 by default, which names no job), whose ``ctx.transaction()`` needs
    ``database`` (a URL, an asyncpg pool, or a connection: inside the connection's own
    transaction it becomes a savepoint) and commits the handler's writes alone, since no
    row is there to complete. Without ``database`` it raises OutboxError.
    """
    spec = registry.get(task)
    if spec is None:
        raise UnknownTask(
            f"the registry has no task {task!r}; it has {sorted(s.name for s in registry)}"
        )
    decoded = json.loads(
        _encode_args(task, {} if args is None else args, _default_max_args_bytes())
    )
    misfit = spec.check_args(decoded)
    if misfit is not None:
        raise InvalidArgs(misfit)
    ctx = _RowlessContext(
        database=database,
        job_id=job_id,
        task=task,
        queue=spec.queue,
        attempt=attempt,
        max_attempts=spec.max_attempts,
        correlation_id=correlation_id,
        worker_id="perform_job",
        pool=None,
        log=structlog.get_logger("outbox_worker"),
    )

    async def run() -> Any:
        current_correlation_id.set(correlation_id)
        async with asyncio.timeout(spec.timeout):
            return await spec.handler(ctx, **decoded)

    # A task of its own, as the worker runs a job: the correlation id set for the handler
    # stays out of the caller's context.
    return await asyncio.create_task(run())


class _RowlessContext(JobContext):
    """A JobContext with no job row behind it: ``transaction()`` commits the handler's writes
    and completes nothing."""

    def __init__(
        self, *, database: str | asyncpg.Pool | asyncpg.Connection | None, **context: Any
    ) -> None:
        super().__init__(**context)
        self._database = database

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        if self._database is None:
            raise OutboxError(
                "ctx.transaction() needs a database: pass perform_job(..., database=...) "
                "a database URL, an asyncpg pool or a connection"
            )
        if self._transaction_used:
            raise OutboxError(
                "ctx.transaction() can be used only once per attempt (run by a worker, it "
                "completes the job)"
            )
        self._transaction_used = True
        async with _connection(self._database) as conn, conn.transaction():
            yield conn
        self.completed_in_transaction = True


@asynccontextmanager
async def _connection(
    database: str | asyncpg.Pool | asyncpg.Connection,
) -> AsyncIterator[asyncpg.Connection]:
    if isinstance(database, str):
        conn = await asyncpg.connect(asyncpg_dsn(database))
        try:
            yield conn
        finally:
            await conn.close()
    elif isinstance(database, asyncpg.Pool):
        async with database.acquire() as conn:
            yield conn
    else:
        yield database
