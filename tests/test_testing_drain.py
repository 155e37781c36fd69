"""outbox_worker.testing.drain on real PostgreSQL: the due jobs run as a worker would run
them, a failed attempt waiting for its backoff, the jobs a drained job enqueues drained too,
and an outcome fenced like the worker's."""

from __future__ import annotations

import json

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from outbox_worker import current_correlation_id, enqueue
from outbox_worker.testing import DrainResult, assert_enqueued, drain
from tests.testing_tasks import committed, side_pool, tasks


async def row(pool: asyncpg.Pool, job_id: int) -> asyncpg.Record:
    return await pool.fetchrow(
        "SELECT state, attempts, result::text AS result, last_error, locked_by, finished_at, "
        "run_at > now() AS later FROM outbox_jobs WHERE id = $1",
        job_id,
    )


@pytest.mark.parametrize("given", ["url", "pool"])
async def test_drain_runs_the_due_jobs_as_a_worker_would(
    engine: AsyncEngine, pool: asyncpg.Pool, database_url: str, given: str
) -> None:
    ids = [await committed(engine, "t_add", {"a": n, "b": 10}) for n in range(3)]
    result = await drain(tasks, database_url if given == "url" else pool)
    assert result == DrainResult(succeeded=3, job_ids=tuple(ids))
    assert result.ran == 3
    for n, job_id in enumerate(ids):
        done = await row(pool, job_id)
        assert (done["state"], done["attempts"], done["result"]) == ("succeeded", 1, str(n + 10))
        assert done["locked_by"] is None
        assert done["finished_at"] is not None


async def test_a_failed_attempt_waits_for_its_backoff_and_the_drain_ends(
    engine: AsyncEngine, pool: asyncpg.Pool, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUTBOX_RETRY_BASE_SECONDS", "3600")
    job_id = await committed(engine, "t_fails", {"message": "smtp is down"})
    assert await drain(tasks, database_url) == DrainResult(retried=1, job_ids=(job_id,))
    failed = await row(pool, job_id)
    assert (failed["state"], failed["attempts"], failed["later"]) == ("queued", 1, True)
    assert failed["last_error"].startswith("RuntimeError: smtp is down")
    assert await drain(tasks, database_url) == DrainResult()


async def test_a_last_attempt_and_a_job_that_can_never_run_go_dead(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    last = await committed(engine, "t_fails", {"message": "no"}, max_attempts=1)
    unknown = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, queue) VALUES ('nobody_has_it', 'default') RETURNING id"
    )
    misfit = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args) VALUES ('t_chain', '{\"m\": 1}') RETURNING id"
    )
    result = await drain(tasks, pool)
    assert result == DrainResult(dead=3, job_ids=(last, unknown, misfit))
    assert (await row(pool, unknown))["last_error"].startswith("unknown task 'nobody_has_it'")
    assert "do not fit" in (await row(pool, misfit))["last_error"]


async def test_jobs_a_drained_job_enqueues_are_drained_too_and_limit_bounds_them(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    await committed(engine, "t_chain", {"n": 3})
    result = await drain(tasks, pool)
    assert (result.succeeded, result.ran) == (3, 3)  # completed in ctx.transaction()

    await committed(engine, "t_chain", {"n": 5})
    bounded = await drain(tasks, pool, limit=2)
    assert (bounded.succeeded, bounded.ran) == (2, 2)
    async with AsyncSession(engine) as session:
        await assert_enqueued(session, "t_chain", {"n": 3}, state="queued", count=1)
    assert await drain(tasks, pool, limit=0) == DrainResult()


async def test_drain_serves_only_the_queues_asked_for(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    fast = await committed(engine, "t_add", {"a": 1})
    default = await committed(engine, "t_context", {})
    assert await drain(tasks, pool, queues=["t_fast"]) == DrainResult(succeeded=1, job_ids=(fast,))
    assert (await row(pool, default))["state"] == "queued"
    with pytest.raises(TypeError, match=r"queues=\['t_fast'\]"):
        await drain(tasks, pool, queues="t_fast")
    with pytest.raises(ValueError, match="limit"):
        await drain(tasks, pool, limit=-1)


async def test_jobs_not_due_and_jobs_not_committed_are_left_alone(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    later = await committed(engine, "t_add", {"a": 1}, delay=3600)
    async with AsyncSession(engine) as session, session.begin():
        await enqueue(session, "t_add", {"a": 2})
        assert await drain(tasks, pool) == DrainResult()
    assert (await row(pool, later))["state"] == "queued"
    assert (await drain(tasks, pool)).succeeded == 1  # the one committed since


async def test_an_outcome_is_fenced_like_the_workers(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    side_pool.set(pool)
    taken = await committed(engine, "t_taken_over", {})
    cancelled = await committed(engine, "t_cancelled_meanwhile", {})
    result = await drain(tasks, pool)
    assert result == DrainResult(lost=1, cancelled=1, job_ids=(taken, cancelled))
    lost = await row(pool, taken)
    assert (lost["state"], lost["locked_by"]) == ("running", "another-worker")
    assert (await row(pool, cancelled))["state"] == "cancelled"


async def test_a_drained_jobs_correlation_id_stays_out_of_the_callers_context(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    job_id = await committed(engine, "t_context", {}, correlation_id="req-42")
    token = current_correlation_id.set("the-test")
    try:
        await drain(tasks, pool)
        assert current_correlation_id.get() == "the-test"
    finally:
        current_correlation_id.reset(token)
    result = json.loads((await row(pool, job_id))["result"])
    assert (result["correlation_id"], result["seen_correlation_id"]) == ("req-42", "req-42")
