"""The circuit breaker: a queue pauses itself once one of its tasks has failed its threshold
of attempts in a row, counted by the database across every worker (a success starts the
count again), says so in the worker's log and metrics, and starts nothing until an operator
resumes it."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import asyncpg
import httpx
from prometheus_client import generate_latest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from outbox_worker import admin, queue_settings, sql
from outbox_worker.devdb import free_port
from tests.conftest import WorkerProcess, wait_until
from tests.support import samples, value

QUEUE = "slow"


async def claimed(pool: asyncpg.Pool, count: int) -> list[tuple[int, int]]:
    """``count`` sleepy jobs of the queue, claimed by worker w: (id, attempt) each."""
    await pool.execute(
        "INSERT INTO outbox_jobs (queue, task) SELECT $1, 'sleepy' FROM generate_series(1, $2)",
        QUEUE,
        count,
    )
    rows = await pool.fetch(
        *sql.bind(
            sql.JOB_CLAIM, queues=[QUEUE], limit=count, ahead=0, worker_id="w", lease_seconds=30
        )
    )
    return [(row["id"], row["attempts"]) for row in rows]


async def fail(pool: asyncpg.Pool, jobs: list[tuple[int, int]]) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        *sql.bind(
            sql.JOB_FAIL_MANY,
            ids=[job_id for job_id, _ in jobs],
            attempts=[attempt for _, attempt in jobs],
            errors=["ConnectionError: smtp refused"] * len(jobs),
            delays=[60.0] * len(jobs),
            give_up=[False] * len(jobs),
            worker_id="w",
        )
    )
    return rows


async def succeed(pool: asyncpg.Pool, jobs: list[tuple[int, int]]) -> None:
    await pool.fetch(
        *sql.bind(
            sql.JOB_COMPLETE_MANY,
            ids=[job_id for job_id, _ in jobs],
            attempts=[attempt for _, attempt in jobs],
            results=[None] * len(jobs),
            worker_id="w",
        )
    )


async def failures(pool: asyncpg.Pool) -> int | None:
    count: int | None = await pool.fetchval(
        "SELECT failures FROM outbox_breakers WHERE queue = $1 AND task = 'sleepy'", QUEUE
    )
    return count


async def paused_by(pool: asyncpg.Pool) -> tuple[str | None, str | None]:
    row = await pool.fetchrow(
        "SELECT paused_by, pause_reason FROM outbox_queues WHERE name = $1", QUEUE
    )
    assert row is not None
    return row["paused_by"], row["pause_reason"]


async def test_failures_in_a_row_pause_the_queue_and_a_success_starts_the_count_again(
    pool: asyncpg.Pool, engine: AsyncEngine
) -> None:
    async with AsyncSession(engine) as session:
        await queue_settings.set_breaker(session, QUEUE, 3)
        await session.commit()
    jobs = await claimed(pool, 6)

    rows = await fail(pool, jobs[:2])
    assert [row["tripped_task"] for row in rows] == [None, None]
    assert await failures(pool) == 2
    await succeed(pool, jobs[2:3])
    assert await failures(pool) == 0
    assert await paused_by(pool) == (None, None)

    rows = await fail(pool, jobs[3:6])
    assert {(row["tripped_task"], row["tripped_after"]) for row in rows} == {("sleepy", 3)}
    by, reason = await paused_by(pool)
    assert by == "breaker"
    assert reason == (
        "task sleepy failed 3 times in a row; last error: ConnectionError: smtp refused"
    )

    async with AsyncSession(engine) as session:
        await admin.refresh_gauges(session, worker_seen_within=60)
        resumed = await queue_settings.resume(session, QUEUE)
        await session.commit()
    page = samples(generate_latest().decode())
    assert value(page, "outbox_queue_paused", queue=QUEUE, by="breaker") == 1.0
    assert not resumed.paused
    assert await failures(pool) == 0, "a resume starts the count again"
    async with AsyncSession(engine) as session:
        await admin.refresh_gauges(session, worker_seen_within=60)
    page = samples(generate_latest().decode())
    assert value(page, "outbox_queue_paused", queue=QUEUE, by="breaker") == 0.0


async def test_a_queue_without_a_breaker_counts_nothing(pool: asyncpg.Pool) -> None:
    await pool.execute("INSERT INTO outbox_queues (name) VALUES ($1)", QUEUE)  # no setting
    rows = await fail(pool, await claimed(pool, 4))
    assert [row["state"] for row in rows] == ["queued"] * 4
    assert await pool.fetchval("SELECT count(*) FROM outbox_breakers") == 0
    assert await paused_by(pool) == (None, None)


async def test_a_worker_whose_task_keeps_failing_pauses_its_queue(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    threshold = 4
    await pool.execute(
        "INSERT INTO outbox_queues (name, breaker_threshold) VALUES ('default', $1)", threshold
    )
    await pool.execute(
        "INSERT INTO outbox_jobs (task) SELECT 'always_fails' FROM generate_series(1, 20)"
    )
    port = free_port()
    worker = spawn_worker("--concurrency", "1", "--prefetch", "0", "--metrics-port", str(port))
    await worker.wait_for_log('"queue_paused_by_breaker"')

    async def started() -> int:
        n: int = await pool.fetchval("SELECT coalesce(sum(attempts), 0) FROM outbox_jobs")
        return n

    await asyncio.sleep(1.5)  # the attempt under way when the breaker tripped ends
    after_pause = await started()
    # One slot: the attempt that tripped it, and at most one claimed before its write.
    assert threshold <= after_pause <= threshold + 1
    await asyncio.sleep(2.0)
    assert await started() == after_pause, "a paused queue starts nothing"
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs WHERE state = 'running'") == 0

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        page = samples((await client.get("/metrics")).text)
    trips = value(page, "outbox_breaker_trips_total", queue="default", task="always_fails")
    assert trips == 1.0

    await pool.execute(
        "UPDATE outbox_queues SET paused_at = NULL, paused_by = NULL, pause_reason = NULL"
    )

    async def ran_again() -> bool:
        return await started() > after_pause

    await wait_until(ran_again, what="jobs started after the queue was resumed")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
