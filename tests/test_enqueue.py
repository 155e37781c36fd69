"""enqueue / enqueue_many through the caller's SQLAlchemy transaction, on a real PostgreSQL:
the job exists iff the caller's transaction commits, and the returned Job is the new row.

Every check of a returned Job is also made against the row as another connection reads it,
so a Job that disagrees with the table fails.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from outbox_worker import Job, JobState, NewJob, current_correlation_id, enqueue, enqueue_many
from tests.support import Enqueuer, assert_job_matches_row, db_now, job_rows
from tests.workload import registry

# ---------------------------------------------------------------------------------------------
# Atomicity: the job exists iff the caller's transaction commits
# ---------------------------------------------------------------------------------------------


async def test_rolled_back_enqueue_leaves_no_job(db: Enqueuer, pool: asyncpg.Pool) -> None:
    job = await enqueue(db, "echo", {"n": 1})
    many = await enqueue_many(db, [NewJob("echo", {"n": 2}), NewJob("noop")])
    assert job.id > 0
    assert len(many) == 2
    await db.rollback()
    assert await job_rows(pool) == []


async def test_closing_without_commit_leaves_no_job(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    async with AsyncSession(engine) as session:
        await enqueue(session, "echo", {"via": "session"})
    async with engine.connect() as conn:
        await enqueue(conn, "echo", {"via": "connection"})
    assert await job_rows(pool) == []


async def test_domain_row_and_job_commit_together_or_not_at_all(
    db: Enqueuer, pool: asyncpg.Pool
) -> None:
    await db.execute(text("CREATE TABLE domain_orders (id integer PRIMARY KEY, note text)"))
    await db.commit()

    await db.execute(text("INSERT INTO domain_orders VALUES (1, 'rolled back')"))
    await enqueue(db, "echo", {"order_id": 1})
    await db.rollback()
    assert await pool.fetch("SELECT id FROM domain_orders") == []
    assert await job_rows(pool) == []

    await db.execute(text("INSERT INTO domain_orders VALUES (2, 'committed')"))
    job = await enqueue(db, "echo", {"order_id": 2})
    await db.commit()
    orders = await pool.fetch("SELECT id, note FROM domain_orders")
    assert [(r["id"], r["note"]) for r in orders] == [(2, "committed")]
    rows = await job_rows(pool)
    assert [r["id"] for r in rows] == [job.id]
    assert json.loads(rows[0]["args_text"]) == {"order_id": 2}


async def test_enqueue_never_commits(db: Enqueuer, pool: asyncpg.Pool) -> None:
    job = await enqueue(db, "echo", {"n": 1})
    many = await enqueue_many(db, [NewJob("noop"), NewJob("echo", {"n": 2})])
    assert db.in_transaction()
    # Another connection sees nothing while the caller's transaction is open.
    assert await job_rows(pool) == []
    # The caller's own transaction sees its rows.
    own = (await db.execute(text("SELECT count(*) FROM outbox_jobs"))).scalar_one()
    assert own == 3
    await db.commit()
    assert [r["id"] for r in await job_rows(pool)] == [job.id, *(j.id for j in many)]


# ---------------------------------------------------------------------------------------------
# The returned Job
# ---------------------------------------------------------------------------------------------


async def test_returned_job_is_the_new_row(db: Enqueuer, pool: asyncpg.Pool) -> None:
    now = await db_now(db)
    job = await enqueue(db, "echo", {"user_id": 42})
    await db.commit()

    assert isinstance(job, Job)
    assert job.task == "echo"
    assert job.queue == "default"
    assert job.args == {"user_id": 42}
    assert job.state is JobState.QUEUED
    assert job.priority == 0
    assert job.attempts == 0
    assert job.max_attempts == 5
    assert job.run_at == now
    assert job.created_at == now
    assert job.dedupe_key is None
    assert job.correlation_id is None
    assert job.last_error is None
    assert job.result is None
    assert job.locked_by is None
    assert job.locked_until is None
    assert job.started_at is None
    assert job.finished_at is None
    assert job.duplicate is False
    rows = await job_rows(pool)
    assert len(rows) == 1
    assert_job_matches_row(job, rows[0])


async def test_args_none_is_an_empty_object(db: Enqueuer, pool: asyncpg.Pool) -> None:
    job = await enqueue(db, "noop")
    explicit = await enqueue(db, "noop", None)
    await db.commit()
    assert job.args == {}
    assert explicit.args == {}
    assert [r["args_text"] for r in await job_rows(pool)] == ["{}", "{}"]


async def test_queue_is_the_tasks_unless_overridden(db: Enqueuer, pool: asyncpg.Pool) -> None:
    task_default = await enqueue(db, "sleepy", {"seconds": 0})  # registered with queue="slow"
    plain_default = await enqueue(db, "echo")
    override = await enqueue(db, "sleepy", {"seconds": 0}, queue="reports.v2:eu-1")
    longest = await enqueue(db, "echo", queue="q" * 128)
    await db.commit()
    assert task_default.queue == "slow"
    assert plain_default.queue == "default"
    assert override.queue == "reports.v2:eu-1"
    assert longest.queue == "q" * 128
    queues = [r["queue"] for r in await job_rows(pool)]
    assert queues == ["slow", "default", "reports.v2:eu-1", "q" * 128]


async def test_priority_default_and_override(db: Enqueuer, pool: asyncpg.Pool) -> None:
    jobs = [
        await enqueue(db, "echo"),
        await enqueue(db, "echo", priority=7),
        await enqueue(db, "echo", priority=-3),
        await enqueue(db, "echo", priority=2**31 - 1),
        await enqueue(db, "echo", priority=-(2**31 - 1)),
    ]
    await db.commit()
    expected = [0, 7, -3, 2**31 - 1, -(2**31 - 1)]
    assert [j.priority for j in jobs] == expected
    assert [r["priority"] for r in await job_rows(pool)] == expected


async def test_max_attempts_task_default_override_and_column_default(
    db: Enqueuer, pool: asyncpg.Pool
) -> None:
    spec = registry.get("always_fails")
    assert spec is not None
    assert spec.max_attempts == 3  # a task default that differs from the column default
    task_default = await enqueue(db, "always_fails")
    override = await enqueue(db, "always_fails", max_attempts=9)
    one = await enqueue(db, "always_fails", max_attempts=1)
    await db.commit()
    plain_id = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args) VALUES ('always_fails', '{}') RETURNING id"
    )

    assert task_default.max_attempts == 3
    assert override.max_attempts == 9
    assert one.max_attempts == 1
    by_id = {r["id"]: r["max_attempts"] for r in await job_rows(pool)}
    assert by_id == {task_default.id: 3, override.id: 9, one.id: 1, plain_id: 5}


async def test_plain_sql_insert_gets_column_defaults(pool: asyncpg.Pool) -> None:
    row = await pool.fetchrow(
        "INSERT INTO outbox_jobs (task) VALUES ('echo') "
        "RETURNING queue, args::text AS args_text, state, priority, attempts, max_attempts, "
        "run_at = now() AS run_now, dedupe_key, correlation_id"
    )
    assert dict(row) == {
        "queue": "default",
        "args_text": "{}",
        "state": "queued",
        "priority": 0,
        "attempts": 0,
        "max_attempts": 5,
        "run_now": True,
        "dedupe_key": None,
        "correlation_id": None,
    }


@pytest.mark.parametrize(
    ("delay", "expected"),
    [
        (30, timedelta(seconds=30)),
        (1.5, timedelta(seconds=1.5)),
        (0, timedelta(0)),
        (timedelta(minutes=5, milliseconds=250), timedelta(minutes=5, milliseconds=250)),
        (timedelta(days=400), timedelta(days=400)),
    ],
    ids=["int-seconds", "float-seconds", "zero", "timedelta", "timedelta-days"],
)
async def test_delay_sets_run_at_from_the_database_clock(
    db: Enqueuer, pool: asyncpg.Pool, delay: float | timedelta, expected: timedelta
) -> None:
    now = await db_now(db)  # constant for the whole transaction
    job = await enqueue(db, "echo", delay=delay)
    [many] = await enqueue_many(db, [NewJob("echo", delay=delay)])
    await db.commit()
    assert job.run_at == now + expected
    assert many.run_at == now + expected
    assert job.created_at == now
    assert [r["run_at"] for r in await job_rows(pool)] == [now + expected, now + expected]


@pytest.mark.parametrize(
    "run_at",
    [
        datetime(2031, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2030, 6, 1, 12, 0, tzinfo=UTC),
        datetime(2001, 1, 1, tzinfo=timezone(timedelta(hours=-8))),  # in the past: due now
    ],
    ids=["future-offset", "future-utc", "past"],
)
async def test_run_at_is_stored_as_given(
    db: Enqueuer, pool: asyncpg.Pool, run_at: datetime
) -> None:
    job = await enqueue(db, "echo", run_at=run_at)
    [many] = await enqueue_many(db, [NewJob("noop", run_at=run_at)])
    await db.commit()
    assert job.run_at == run_at
    assert many.run_at == run_at
    assert [r["run_at"] for r in await job_rows(pool)] == [run_at, run_at]


async def test_correlation_id_explicit(db: Enqueuer, pool: asyncpg.Pool) -> None:
    assert current_correlation_id.get() is None
    job = await enqueue(db, "echo", correlation_id="req-explicit-1")
    none = await enqueue(db, "echo")
    await db.commit()
    assert job.correlation_id == "req-explicit-1"
    assert none.correlation_id is None
    assert [r["correlation_id"] for r in await job_rows(pool)] == ["req-explicit-1", None]


async def test_correlation_id_from_the_contextvar(
    db: Enqueuer, pool: asyncpg.Pool, correlation: str
) -> None:
    implicit = await enqueue(db, "echo")
    explicit = await enqueue(db, "echo", correlation_id="req-other")
    many = await enqueue_many(db, [NewJob("noop"), NewJob("noop", correlation_id="req-x")])
    await db.commit()
    assert implicit.correlation_id == correlation
    assert explicit.correlation_id == "req-other"
    assert [j.correlation_id for j in many] == [correlation, "req-x"]
    stored = [r["correlation_id"] for r in await job_rows(pool)]
    assert stored == [correlation, "req-other", correlation, "req-x"]


ROUND_TRIP_ARGS: list[dict[str, Any]] = [
    {},
    {"user_id": 42},
    {
        "text": "héllo wörld — ✓ 😀 中文",
        "empty": "",
        "quote": 'it\'s "quoted" \\ backslash\nnewline\ttab',
        "int": -17,
        "big": 2**70,
        "float": 1.5,
        "small": 0.001,
        "true": True,
        "false": False,
        "null": None,
        "list": [1, "two", [3, {"four": 4}], None],
        "nested": {"a": {"b": {"c": []}}},
        "sql": "'; DROP TABLE outbox_jobs; --",
    },
    {"😀 key": 1, "": "empty key", "a.b:c": {"x-y": [True]}},
]


@pytest.mark.parametrize("args", ROUND_TRIP_ARGS, ids=["empty", "simple", "mixed", "keys"])
async def test_args_round_trip(db: Enqueuer, pool: asyncpg.Pool, args: dict[str, Any]) -> None:
    job = await enqueue(db, "echo", args)
    [many] = await enqueue_many(db, [NewJob("echo", args)])
    await db.commit()
    assert job.args == args
    assert many.args == args
    assert [json.loads(r["args_text"]) for r in await job_rows(pool)] == [args, args]


async def test_args_with_backslash_u0000_text_round_trip(db: Enqueuer, pool: asyncpg.Pool) -> None:
    """A literal backslash followed by ``u0000`` is ordinary text, not a NUL character;
    jsonb stores it fine, so enqueue must accept it."""
    args = {"path": "C:\\u0000\\dir", "pattern": "\\u0000"}
    assert "\x00" not in json.dumps(args, ensure_ascii=False)
    job = await enqueue(db, "echo", args)
    await db.commit()
    assert job.args == args
    assert [json.loads(r["args_text"]) for r in await job_rows(pool)] == [args]
