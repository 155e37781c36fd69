"""Waiting for a job to finish: woken by the job's own NOTIFY when a worker process finishes
it, through its retries, by polling when no notification comes, and a timeout that says
where the job stands."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import pytest

from outbox_worker import (
    JobNotFound,
    JobState,
    JobWaitTimeout,
    WrongSession,
    sync,
    wait_for_job,
)
from tests.conftest import WorkerProcess

# Far longer than any wait below: a wait that ends before it was woken by the notification.
NEVER_POLL = 30.0


async def queued(pool: asyncpg.Pool, task: str, args: str = "{}") -> int:
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args) VALUES ($1, $2::jsonb) RETURNING id", task, args
    )
    return job_id


async def test_a_waiter_is_woken_when_a_worker_finishes_the_job(
    pool: asyncpg.Pool, database_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    job_id = await queued(pool, "echo", '{"answer": 42}')
    began = time.monotonic()
    waiting = asyncio.create_task(
        wait_for_job(database_url, job_id, timeout=25, poll_interval=NEVER_POLL)
    )
    await asyncio.sleep(0.5)
    assert not waiting.done()
    assert await pool.fetchval("SELECT notify_done FROM outbox_jobs WHERE id = $1", job_id)
    worker = spawn_worker()
    job = await waiting
    assert time.monotonic() - began < NEVER_POLL - 5, "woken by the poll, not the NOTIFY"
    assert (job.id, job.state, job.result, job.attempts) == (
        job_id,
        JobState.SUCCEEDED,
        {"answer": 42},
        1,
    )
    worker.kill()


async def test_the_wait_goes_on_through_retries_to_the_end(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    job_id = await queued(pool, "flaky", '{"failures": 2}')
    worker = spawn_worker()
    job = await wait_for_job(pool, job_id, timeout=25, poll_interval=NEVER_POLL)
    assert (job.state, job.attempts, job.result) == (JobState.SUCCEEDED, 3, "ok")
    worker.kill()


@pytest.mark.parametrize("end", ["dead", "cancelled"])
async def test_dead_and_cancelled_are_ends_too(pool: asyncpg.Pool, end: str) -> None:
    job_id = await queued(pool, "echo")
    async with pool.acquire() as conn:
        waiting = asyncio.create_task(
            wait_for_job(conn, job_id, timeout=25, poll_interval=NEVER_POLL)
        )
        await asyncio.sleep(0.3)
        await pool.execute(
            "UPDATE outbox_jobs SET state = $2, finished_at = now(), last_error = 'by hand'"
            " WHERE id = $1",
            job_id,
            end,
        )
        job = await waiting
    assert (job.state, job.last_error) == (end, "by hand")


async def test_without_notifications_the_wait_polls(pool: asyncpg.Pool) -> None:
    await pool.execute("ALTER TABLE outbox_jobs DISABLE TRIGGER outbox_jobs_done_notify")
    job_id = await queued(pool, "echo")
    waiting = asyncio.create_task(wait_for_job(pool, job_id, timeout=25, poll_interval=0.2))
    await asyncio.sleep(0.3)
    await pool.execute(
        "UPDATE outbox_jobs SET state = 'succeeded', finished_at = now(), result = '7'"
        " WHERE id = $1",
        job_id,
    )
    job = await waiting
    assert (job.state, job.result) == (JobState.SUCCEEDED, 7)


async def test_a_finished_job_is_answered_at_once_and_left_unmarked(pool: asyncpg.Pool) -> None:
    job_id = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, state, attempts, finished_at, result)"
        " VALUES ('echo', 'succeeded', 1, now(), '\"done\"') RETURNING id"
    )
    job = await wait_for_job(pool, job_id, timeout=0)
    assert (job.state, job.result) == (JobState.SUCCEEDED, "done")
    assert not await pool.fetchval("SELECT notify_done FROM outbox_jobs WHERE id = $1", job_id)


async def test_a_timeout_says_where_the_job_stands(pool: asyncpg.Pool) -> None:
    job_id = await queued(pool, "echo")
    with pytest.raises(
        JobWaitTimeout, match=rf"job {job_id} did not finish within 0.3s: it is queued"
    ):
        await wait_for_job(pool, job_id, timeout=0.3, poll_interval=0.1)
    with pytest.raises(TimeoutError):  # JobWaitTimeout is one
        await wait_for_job(pool, job_id, timeout=0)
    state = await pool.fetchval("SELECT state FROM outbox_jobs WHERE id = $1", job_id)
    assert state == "queued", "waiting changes nothing but the flag"


async def test_bad_waits_are_refused(pool: asyncpg.Pool) -> None:
    for missing in (987654321, 0, -1, 2**70):
        with pytest.raises(JobNotFound):
            await wait_for_job(pool, missing, timeout=1)
    job_id = await queued(pool, "echo")
    with pytest.raises(ValueError, match="timeout"):
        await wait_for_job(pool, job_id, timeout=-1)
    with pytest.raises(ValueError, match="poll_interval"):
        await wait_for_job(pool, job_id, timeout=1, poll_interval=0)
    with pytest.raises(TypeError, match="database URL"):
        await wait_for_job(object(), job_id, timeout=1)


async def test_the_sync_wait_blocks_in_a_thread_and_refuses_an_event_loop(
    pool: asyncpg.Pool, database_url: str
) -> None:
    job_id = await queued(pool, "echo")
    waiting = asyncio.create_task(
        asyncio.to_thread(sync.wait_for_job, database_url, job_id, timeout=25, poll_interval=0.2)
    )
    await asyncio.sleep(0.5)
    await pool.execute(
        "UPDATE outbox_jobs SET state = 'dead', finished_at = now() WHERE id = $1", job_id
    )
    assert (await waiting).state == JobState.DEAD
    with pytest.raises(WrongSession, match=r"await outbox_worker\.wait_for_job"):
        sync.wait_for_job(database_url, job_id, timeout=1)
