"""enqueue_many through the caller's SQLAlchemy transaction, on a real PostgreSQL: a whole
batch in one statement, the returned Jobs in input order.

Every check of a returned Job is also made against the row as another connection reads it,
so a Job that disagrees with the table fails.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from outbox_worker import JobState, NewJob, current_correlation_id, enqueue, enqueue_many
from tests.support import Enqueuer, assert_job_matches_row, db_now, job_rows


async def test_enqueue_many_writes_in_one_statement_in_input_order(
    db: Enqueuer, engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    single = await enqueue(db, "noop")
    statements: list[str] = []

    def record(
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        if "outbox_jobs" in statement:
            statements.append(statement)

    inputs = [
        NewJob("echo", {"i": 0}),
        NewJob("noop"),
        NewJob("takes_id", {"user_id": 7}),
        NewJob("echo", {"i": 3}),
        NewJob("sleepy", {"seconds": 0}),
    ]
    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        jobs = await enqueue_many(db, inputs)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)
    await db.commit()

    assert len(statements) == 1
    assert [(j.task, j.args) for j in jobs] == [(n.task, dict(n.args)) for n in inputs]
    assert [j.duplicate for j in jobs] == [False] * len(inputs)
    ids = [j.id for j in jobs]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    rows = await job_rows(pool)
    assert [r["id"] for r in rows] == [single.id, *ids]
    for job, row in zip(jobs, rows[1:], strict=True):
        assert_job_matches_row(job, row)
    # The database agrees: the rows of the call share one command id, unlike the single one.
    cmins = await pool.fetch("SELECT id, cmin::text::int AS cmin FROM outbox_jobs ORDER BY id")
    assert len({r["cmin"] for r in cmins[1:]}) == 1
    assert cmins[0]["cmin"] != cmins[1]["cmin"]


async def test_enqueue_many_a_thousand_jobs(db: Enqueuer, pool: asyncpg.Pool) -> None:
    inputs = [NewJob("echo", {"i": i}, priority=i % 7) for i in range(1000)]
    jobs = await enqueue_many(db, inputs)
    await db.commit()
    assert len(jobs) == 1000
    assert [j.args["i"] for j in jobs] == list(range(1000))
    assert [j.priority for j in jobs] == [i % 7 for i in range(1000)]
    assert all(not j.duplicate for j in jobs)
    rows = await job_rows(pool)
    assert len(rows) == 1000
    assert {r["id"]: json.loads(r["args_text"])["i"] for r in rows} == {
        j.id: j.args["i"] for j in jobs
    }


async def test_enqueue_many_mixed_tasks_and_options(
    db: Enqueuer, pool: asyncpg.Pool, correlation: str
) -> None:
    now = await db_now(db)
    at = datetime(2032, 2, 29, 23, 59, 59, tzinfo=timezone(timedelta(hours=2)))
    inputs = [
        NewJob("echo", {"a": 1}),
        NewJob("sleepy", {"seconds": 0.1}, queue="other", priority=5),
        NewJob("always_fails", max_attempts=8, delay=60),
        NewJob("flaky", {"failures": 2}, key="flaky-1", run_at=at),
        NewJob("takes_id", {"user_id": 3}, correlation_id="req-mixed", delay=timedelta(hours=1)),
        NewJob("always_fails"),
    ]
    jobs = await enqueue_many(db, inputs)
    await db.commit()

    assert [j.task for j in jobs] == [n.task for n in inputs]
    assert [j.args for j in jobs] == [dict(n.args) for n in inputs]
    assert [j.queue for j in jobs] == [
        "default",
        "other",
        "default",
        "default",
        "default",
        "default",
    ]
    assert [j.priority for j in jobs] == [0, 5, 0, 0, 0, 0]
    assert [j.max_attempts for j in jobs] == [5, 5, 8, 5, 5, 3]
    assert [j.run_at for j in jobs] == [
        now,
        now,
        now + timedelta(seconds=60),
        at,
        now + timedelta(hours=1),
        now,
    ]
    assert [j.dedupe_key for j in jobs] == [None, None, None, "flaky-1", None, None]
    assert [j.correlation_id for j in jobs] == [
        correlation,
        correlation,
        correlation,
        correlation,
        "req-mixed",
        correlation,
    ]
    assert all(j.state is JobState.QUEUED and not j.duplicate for j in jobs)
    rows = await job_rows(pool)
    assert len(rows) == len(jobs)
    for job, row in zip(jobs, rows, strict=True):
        assert_job_matches_row(job, row)


@pytest.mark.parametrize(
    "odd_one_out",
    [
        pytest.param(None, id="alike-but-args"),
        pytest.param(NewJob("echo", {"i": 99}, priority=5), id="one-other-priority"),
        pytest.param(NewJob("echo", {"i": 99}, delay=30), id="one-other-delay"),
        pytest.param(NewJob("echo", {"i": 99}, queue="other"), id="one-other-queue"),
        pytest.param(NewJob("echo", {"i": 99}, correlation_id="req-odd"), id="one-other-id"),
    ],
)
async def test_enqueue_many_of_jobs_alike_returns_the_rows_written(
    db: Enqueuer, pool: asyncpg.Pool, odd_one_out: NewJob | None
) -> None:
    """A batch of one task's jobs that differ only in args takes a shorter statement; one
    job that differs in anything else sends the batch down the general one. Either way the
    returned Jobs are the rows, in input order."""
    now = await db_now(db)
    inputs = [NewJob("echo", {"i": i, "name": f"ü-{i}"}, delay=2) for i in range(40)]
    if odd_one_out is not None:
        inputs.insert(17, odd_one_out)
    token = current_correlation_id.set("req-batch")
    try:
        jobs = await enqueue_many(db, inputs)
    finally:
        current_correlation_id.reset(token)
    await db.commit()

    rows = await job_rows(pool)
    assert [j.id for j in jobs] == [r["id"] for r in rows]
    for job, row in zip(jobs, rows, strict=True):
        assert_job_matches_row(job, row)
        assert (job.state, job.attempts, job.duplicate) == (JobState.QUEUED, 0, False)
    assert [j.args for j in jobs] == [dict(n.args) for n in inputs]
    alike = [j for n, j in zip(inputs, jobs, strict=True) if n is not odd_one_out]
    assert {(j.queue, j.priority, j.run_at, j.correlation_id) for j in alike} == {
        ("default", 0, now + timedelta(seconds=2), "req-batch")
    }


async def test_enqueue_many_of_nothing(db: Enqueuer, pool: asyncpg.Pool) -> None:
    assert await enqueue_many(db, []) == []
    await db.commit()
    assert await job_rows(pool) == []
