"""Plain ``def`` handlers, run in the worker's pool of threads: they succeed, fail and retry as
async ones do, the event loop (heartbeats, other jobs) goes on while they block, and a
timeout a thread cannot honour fails the attempt while the thread runs on, holding its thread
and its slot until it returns."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
import structlog

from outbox_worker import (
    JobContext,
    OutboxError,
    Registry,
    SyncTask,
    TaskDefinitionError,
    Worker,
    WorkerOptions,
)
from outbox_worker.testing import DrainResult, drain, perform_job
from tests.conftest import WorkerProcess, wait_until
from tests.faults.invariants import log_events
from tests.offload_tasks import Threads, add, registry
from tests.support import insert_job as enqueue

TASKS = "tests.offload_tasks:registry"


async def row(pool: asyncpg.Pool, job_id: int) -> asyncpg.Record:
    found = await pool.fetchrow(
        "SELECT state, attempts, result::text AS result, last_error, locked_until, started_at,"
        " finished_at, progress::text AS progress FROM outbox_jobs WHERE id = $1",
        job_id,
    )
    assert found is not None
    return found


async def state_of(pool: asyncpg.Pool, job_id: int) -> str:
    state: str = await pool.fetchval("SELECT state FROM outbox_jobs WHERE id = $1", job_id)
    return state


@asynccontextmanager
async def running(database_url: str, **options: Any) -> AsyncIterator[Worker]:
    """A worker of tests/offload_tasks.py's registry in this process, stopped at the end."""
    worker = Worker(registry, WorkerOptions(dsn=database_url, poll_interval=0.05, **options))
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.ready.wait(), timeout=60)
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, timeout=60)


def context() -> JobContext:
    return JobContext(
        job_id=1,
        task="add",
        queue="default",
        attempt=1,
        max_attempts=1,
        correlation_id=None,
        worker_id="w",
        pool=None,
        log=structlog.get_logger(),
    )


def test_a_plain_def_is_a_task_that_runs_in_a_thread() -> None:
    assert isinstance(add, SyncTask)
    assert add(context(), a=1, b=2)["sum"] == 3  # called as it is: no coroutine
    spec = registry.get("add")
    assert spec is not None
    assert spec.run_in == "thread"
    quick = registry.get("quick")
    assert quick is not None
    assert quick.run_in == "loop"

    async def coroutine(ctx: JobContext) -> None:
        return None

    with pytest.raises(TaskDefinitionError, match="plain def"):
        Registry().add(coroutine, run_in="thread")


async def test_a_sync_handler_succeeds_fails_and_retries(pool: asyncpg.Pool) -> None:
    ok = await enqueue(pool, "add", {"a": 1, "b": 2})
    failing = await enqueue(pool, "add", {"a": -1, "b": 2}, max_attempts=3)
    no_transaction = await enqueue(pool, "wants_a_transaction", max_attempts=1)
    result = await drain(registry, pool)
    assert result == DrainResult(
        succeeded=1, retried=1, dead=1, job_ids=(ok, failing, no_transaction)
    )
    answer = json.loads((await row(pool, ok))["result"])
    assert answer["sum"] == 3
    assert answer["thread"].startswith("outbox-sync-handler")
    retried = await row(pool, failing)
    assert (retried["state"], retried["attempts"]) == ("queued", 1)
    assert retried["last_error"].startswith("ValueError: a is negative: -1")
    dead = await row(pool, no_transaction)
    assert dead["last_error"].startswith("OutboxError: ctx.transaction() is for async handlers")


async def test_perform_job_runs_a_plain_def_in_a_thread() -> None:
    answer = await perform_job(registry, "add", {"a": 2, "b": 3})
    assert answer["sum"] == 5
    assert answer["thread"].startswith("outbox-sync-handler")
    with pytest.raises(ValueError, match="negative"):
        await perform_job(registry, "add", {"a": -2, "b": 3})
    with pytest.raises(OutboxError, match="async handlers"):
        await perform_job(registry, "wants_a_transaction")
    Threads.reset()
    with pytest.raises(TimeoutError):
        await perform_job(registry, "overruns", {"seconds": 0.5})

    async def ended() -> bool:
        return bool(Threads.ended)

    await wait_until(ended, timeout=10, what="the thread to return")
    # The thread ran on past the timeout, and was told its attempt had ended.
    assert Threads.ended[0][1] is True


async def test_the_event_loop_goes_on_while_a_sync_handler_blocks(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """Heartbeats every half second extend the sleeper's lease (and write its progress) while
    its thread sleeps for several of them, and async jobs come and go meanwhile."""
    async with running(database_url, lease_seconds=1.5, concurrency=10):
        sleeper = await enqueue(pool, "sleeps", {"seconds": 3.0})

        async def started() -> bool:
            return await state_of(pool, sleeper) == "running"

        await wait_until(started, timeout=30, interval=0.02, what="the sleeper to start")
        first = await row(pool, sleeper)
        quick = [await enqueue(pool, "quick") for _ in range(30)]
        leases = {first["locked_until"]}
        while (current := await row(pool, sleeper))["state"] == "running":
            leases.add(current["locked_until"])
            await asyncio.sleep(0.1)
        done = await row(pool, sleeper)
        assert (done["state"], done["attempts"], json.loads(done["result"])) == (
            "succeeded",
            1,
            "awake",
        )
        # Extended by beats while the thread slept (a beat every 0.5 s for 3 s).
        assert len(leases) >= 3, leases
        assert json.loads(done["progress"]) == {"sleeping": 3.0}
        quick_rows = [await row(pool, job_id) for job_id in quick]
        assert {r["state"] for r in quick_rows} == {"succeeded"}
        assert max(r["finished_at"] for r in quick_rows) < done["finished_at"]


async def test_a_timeout_fails_the_attempt_and_the_thread_bound_holds(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """Four jobs that run past their timeout, two threads: each attempt fails with the
    timeout, each thread runs on and is told so, and never more than two run at once (the
    jobs waiting for a thread do not spend their timeout meanwhile)."""
    Threads.reset()
    async with running(database_url, concurrency=4, handler_threads=2):
        jobs = [await enqueue(pool, "overruns", {"seconds": 0.6}, max_attempts=1) for _ in range(4)]

        async def all_ended() -> bool:
            return len(Threads.ended) == len(jobs)

        await wait_until(all_ended, timeout=60, what="every thread to return")
        for job_id in jobs:
            dead = await row(pool, job_id)
            assert dead["state"] == "dead"
            assert dead["last_error"].startswith(
                "TimeoutError: overruns ran longer than its timeout of 0.2s"
            ), dead["last_error"]
    assert Threads.most <= 2
    assert sorted(Threads.ended) == [(job_id, True) for job_id in jobs]


async def test_a_thread_that_runs_on_keeps_its_slot(pool: asyncpg.Pool, database_url: str) -> None:
    """One slot: the job after a timed-out one starts only once the thread has returned, so
    the worker never runs more handlers than its concurrency."""
    Threads.reset()
    async with running(database_url, concurrency=1):
        overran = await enqueue(pool, "overruns", {"seconds": 0.8}, max_attempts=1)
        after = await enqueue(pool, "notes_threads")

        async def finished() -> bool:
            return await state_of(pool, after) == "succeeded"

        await wait_until(finished, timeout=60, what="the job after the timed-out one")
        assert (await row(pool, overran))["state"] == "dead"
        assert json.loads((await row(pool, after))["result"]) == 0  # no overrun still running


@pytest.mark.slow
async def test_sigterm_is_not_held_up_by_a_busy_sync_handler(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """Past the drain timeout the job is handed back; its thread cannot be stopped, so the
    worker exits without waiting for it (os._exit, as for any stray thread)."""
    worker = spawn_worker("--drain-timeout-seconds", "1", target=TASKS)
    await worker.wait_for_log("worker_ready")
    job_id = await enqueue(pool, "sleeps", {"seconds": 60})

    async def started() -> bool:
        return await state_of(pool, job_id) == "running"

    await wait_until(started, timeout=30, what="the sleeper to start")
    worker.signal(signal.SIGTERM)
    began = time.monotonic()
    assert await asyncio.to_thread(worker.wait, 60) == 0, worker.output()[-3000:]
    # Generous: a drain timeout of 1 s against a thread that sleeps for 60.
    assert time.monotonic() - began < 30
    released = await row(pool, job_id)
    assert (released["state"], released["attempts"]) == ("queued", 1)
    assert {e["job_id"] for e in log_events(worker, "job_released")} == {job_id}
    assert log_events(worker, "handler_thread_runs_on")
    assert log_events(worker, "handlers_abandoned")
