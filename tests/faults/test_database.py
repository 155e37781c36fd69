"""Faults of the database side: PostgreSQL restarted in the middle of running jobs (fast and
immediate shutdown), the workers' connections, pooled and listening, killed again and
again, and a job's row locked by another session past its lease. Every committed job must
still end, and the invariants must hold."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Literal

import asyncpg
import pytest

from outbox_worker.devdb import PostgresServer, with_application_name
from tests.conftest import WorkerProcess, wait_until
from tests.faults.harness import (
    busy_pids,
    fetch_retrying,
    insert_jobs,
    insert_sleepy,
    settle,
    stop_workers,
    through_restarts,
)
from tests.faults.invariants import check_invariants, log_events
from tests.support import ensure_server_up

# The slow tier (`make test-slow`): processes, servers and builds, minutes in all.
pytestmark = pytest.mark.slow

# Idempotent (dedupe keys), so that a batch retried after a commit whose answer was lost
# cannot add rows: the enqueuer must know exactly which jobs were committed.
ENQUEUE_BATCH = """
INSERT INTO outbox_jobs (queue, task, args, dedupe_key)
SELECT CASE WHEN g % 2 = 0 THEN 'slow' ELSE 'default' END,
       CASE WHEN g % 2 = 0 THEN 'sleepy' ELSE 'echo' END,
       CASE WHEN g % 2 = 0 THEN '{"seconds": 0.4}'::jsonb ELSE jsonb_build_object('n', g) END,
       $1 || '-' || g
FROM generate_series($2::int, $3::int) g
ON CONFLICT (task, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
"""


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_restarted_twice_mid_run(
    pg_server: PostgresServer,
    database_url: str,
    pool: asyncpg.Pool,
    spawn_worker: Callable[..., WorkerProcess],
    mode: Literal["fast", "immediate"],
) -> None:
    if not pg_server.can_restart:
        pytest.skip("this PostgreSQL was given by URL and cannot be restarted from here")
    # Down for longer than the lease in immediate mode: leases expire while it is away.
    down = 0.3 if mode == "fast" else 2.0
    flags = ("--lease-seconds", "1.5", "--poll-interval-seconds", "0.2", "--concurrency", "4")
    workers = [spawn_worker(*flags) for _ in range(2)]
    for worker in workers:
        await worker.wait_for_log("worker_ready")
    total, batch = 80, 5
    enqueued = 0

    async def enqueue_over_time() -> None:
        nonlocal enqueued
        for first in range(1, total + 1, batch):
            await fetch_retrying(database_url, ENQUEUE_BATCH, mode, first, first + batch - 1)
            enqueued = first + batch - 1
            await asyncio.sleep(0.15)

    async def mid_run() -> bool:
        return bool(await through_restarts(pool, functools.partial(busy_pids, pool, "sleepy")))

    enqueuer = asyncio.create_task(enqueue_over_time())
    try:
        for _ in range(2):
            await wait_until(mid_run, timeout=30, what="handlers running")
            await asyncio.to_thread(pg_server.restart, mode, down)
        await asyncio.wait_for(enqueuer, timeout=60)
    finally:
        enqueuer.cancel()
        with contextlib.suppress(BaseException):
            await enqueuer
        await ensure_server_up(pg_server)

    assert enqueued == total
    await through_restarts(pool, functools.partial(settle, pool, 60))
    rows = await pool.fetch("SELECT id FROM outbox_jobs WHERE dedupe_key LIKE $1", f"{mode}-%")
    assert len(rows) == total  # every batch committed exactly once: nothing lost, no extras
    for worker in workers:
        assert worker.proc.poll() is None, worker.output()[-3000:]
        assert log_events(worker, "database_retry") or log_events(worker, "heartbeat_missed")
        assert log_events(worker, "listener_lost")
    await stop_workers(workers)
    report = await check_invariants(pool, workers=workers, expected_ids=[r["id"] for r in rows])
    assert report.states["succeeded"] + report.states["dead"] == total
    # A job dies only of running out of attempts, with the cause written down.
    for row in await pool.fetch(
        "SELECT last_error, attempts FROM outbox_jobs WHERE state = 'dead'"
    ):
        assert row["attempts"] == 5, dict(row)


async def _terminate(pool: asyncpg.Pool, names: list[str]) -> int:
    killed: int = await pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = ANY($1::text[])",
        names,
    )
    return killed


async def _started_after(pool: asyncpg.Pool, job_id: int) -> timedelta | None:
    value: timedelta | None = await pool.fetchval(
        "SELECT min(e.at) - j.created_at FROM outbox_jobs j "
        "JOIN test_executions e ON e.job_id = j.id WHERE j.id = $1 GROUP BY j.created_at",
        job_id,
    )
    return value


async def test_worker_and_listener_connections_killed_again_and_again(
    database_url: str, pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    env = {
        "DATABASE_URL": with_application_name(database_url, "fault-pool"),
        "OUTBOX_LISTEN_DATABASE_URL": with_application_name(database_url, "fault-listen"),
    }
    # Slow polling: wake-ups after the last kill can only come from a re-armed LISTEN.
    flags = ("--lease-seconds", "1", "--poll-interval-seconds", "2", "--concurrency", "4")
    workers = [spawn_worker(*flags, env=env) for _ in range(2)]
    for worker in workers:
        await worker.wait_for_log('"listening"')
    expected: list[int] = []
    targets = [["fault-listen"], ["fault-pool"], ["fault-pool", "fault-listen"]] * 2
    for names in targets:
        expected += await insert_sleepy(pool, 3, 0.3)
        expected += await insert_jobs(pool, "echo", 3)
        await asyncio.sleep(0.4)
        assert await _terminate(pool, names) >= 1, names
    await asyncio.sleep(0.5)

    for worker in workers:

        async def relistening(worker: WorkerProcess = worker) -> bool:
            return len(log_events(worker, "listening")) >= 4  # re-armed after kills

        await wait_until(relistening, timeout=20, what=f"worker {worker.pid} to listen again")
    await settle(pool, timeout=60)
    # Listening again: an idle worker is woken by NOTIFY, not by its 2 s poll.
    for _ in range(3):
        await asyncio.sleep(0.3)
        [job_id] = await insert_jobs(pool, "echo", 1)
        expected.append(job_id)
        latency = await wait_until(
            functools.partial(_started_after, pool, job_id), timeout=15, what="a fresh job"
        )
        assert latency < timedelta(seconds=0.5), f"job {job_id} started {latency} after insert"

    for worker in workers:
        assert worker.proc.poll() is None, worker.output()[-3000:]
        assert log_events(worker, "listener_lost")
    await stop_workers(workers)
    report = await check_invariants(pool, workers=workers, expected_ids=expected)
    assert report.states["succeeded"] + report.states["dead"] == len(expected)
    assert set(report.repeats) <= {"failed", "lease_expired"}, report.repeats


async def _hold_row_lock(pool: asyncpg.Pool, job_id: int, seconds: float) -> datetime:
    """Lock one job's row from another session (an operator's SELECT … FOR UPDATE in psql)
    for ``seconds``; returns the row's lease end when the lock was taken."""
    async with pool.acquire() as conn, conn.transaction():
        locked_until: datetime = await conn.fetchval(
            "SELECT locked_until FROM outbox_jobs WHERE id = $1 FOR UPDATE", job_id
        )
        await asyncio.sleep(seconds)
    return locked_until


async def test_a_row_lock_held_past_the_lease_stops_the_handler_before_the_lease_lapses(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """The heartbeat skips rows another session has locked, so that one lock cannot stall
    every lease. A lease it could not extend is not ignored: a short lock is waited out (the
    next beats come sooner), and a lock held past the lease stops the handler before the
    lease lapses, so that the job never runs twice at once once a rescuer takes it back."""
    worker = spawn_worker("--lease-seconds", "3", "--poll-interval-seconds", "0.2")
    await worker.wait_for_log("worker_ready")
    [short, long] = await insert_sleepy(pool, 2, 6.0)

    async def both_running() -> bool:
        busy = await busy_pids(pool, "sleepy")
        return sorted(j for jobs in busy.values() for j in jobs) == [short, long]

    await wait_until(both_running, what="both sleepy jobs to start", timeout=20)

    await _hold_row_lock(pool, short, 1.5)  # a beat falls inside: missed, then made up
    lease_end = await _hold_row_lock(pool, long, 5.0)  # longer than the 3 s lease
    stopped = log_events(worker, "job_stopped_lease_lapsing")
    assert [e["job_id"] for e in stopped] == [long], worker.output()[-3000:]
    assert datetime.fromisoformat(stopped[0]["timestamp"]) < lease_end
    assert short in {j for e in log_events(worker, "lease_not_extended") for j in e["jobs"]}

    await settle(pool, timeout=40)
    await stop_workers([worker])
    runs = await pool.fetch(
        "SELECT job_id, attempt, array_agg(event ORDER BY seq) AS events FROM test_executions "
        "GROUP BY job_id, attempt ORDER BY job_id, attempt"
    )
    assert [(r["job_id"], r["attempt"], r["events"]) for r in runs] == [
        (short, 1, ["start", "end"]),
        (long, 1, ["start"]),  # stopped: it never ran on beside attempt 2
        (long, 2, ["start", "end"]),
    ]
    report = await check_invariants(pool, workers=[worker], expected_ids=[short, long])
    assert report.states == {"succeeded": 2}
    assert report.overlaps == 0


async def test_sigterm_with_the_database_away_still_ends_the_worker(
    pg_server: PostgresServer, pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """Every step of a stop is bounded: handlers get the drain timeout, and the outcomes a
    few seconds more, even when the database is away and a write of them is already being
    retried. What was not written is left to the leases, and a rescuer takes those jobs
    once the database is back."""
    if not pg_server.can_restart:
        pytest.skip("this PostgreSQL was given by URL and cannot be stopped from here")
    worker = spawn_worker("--lease-seconds", "3", "--drain-timeout-seconds", "1")
    await worker.wait_for_log("worker_ready")
    jobs = await insert_sleepy(pool, 3, 1.0)

    async def all_running() -> bool:
        busy = await busy_pids(pool, "sleepy")
        return len(busy.get(worker.pid, [])) == len(jobs)

    async def outcomes_being_retried() -> bool:
        failed = {e["job_id"] for e in log_events(worker, "job_failed")}
        return failed == set(jobs) and bool(log_events(worker, "database_retry"))

    await wait_until(all_running, what="the sleepy jobs to start")
    await asyncio.to_thread(pg_server.stop_server, "immediate")
    try:
        # The handlers end (their last record cannot be written: they fail), and the
        # worker keeps trying to write those failures.
        await wait_until(outcomes_being_retried, timeout=20, what="the failures' writes")
        worker.signal(signal.SIGTERM)
        # Generous (drain 1 s, write grace 5 s), yet far from a hang.
        code = await asyncio.to_thread(worker.wait, 30)
    finally:
        await ensure_server_up(pg_server)
    assert code == 0, worker.output()[-3000:]
    unwritten = {j for e in log_events(worker, "outcomes_not_written") for j in e["jobs"]}
    assert unwritten == set(jobs), worker.output()[-3000:]

    rescuer = spawn_worker("--lease-seconds", "3")
    await through_restarts(pool, functools.partial(settle, pool, 40))
    await stop_workers([rescuer])
    report = await check_invariants(pool, workers=[worker, rescuer], expected_ids=jobs)
    assert report.states == {"succeeded": len(jobs)}


async def test_a_locked_row_holds_up_only_its_own_outcome(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """A job's handler has ended, and another session locks its row before the worker writes
    its outcome. That write waits; the worker's other outcomes must not wait with it (they
    used to: one statement at a time, every job behind the lock stalled, and their slots
    with them). The waiting outcome lands once the lock is gone."""
    worker = spawn_worker("--lease-seconds", "30", "--concurrency", "4")
    await worker.wait_for_log("worker_ready")
    [locked] = await insert_sleepy(pool, 1, 1.0)

    async def running() -> bool:
        return locked in (await busy_pids(pool, "sleepy")).get(worker.pid, [])

    await wait_until(running, what="the sleepy job to start")
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM outbox_jobs WHERE id = $1 FOR UPDATE", locked)

        async def handler_ended() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT count(*) FROM test_executions WHERE job_id = $1 AND event = 'end'",
                    locked,
                )
            )

        await wait_until(handler_ended, what="the sleepy job's handler to end")
        others = await insert_jobs(pool, "echo", 20)

        async def others_done() -> bool:
            n = await pool.fetchval(
                "SELECT count(*) FROM outbox_jobs WHERE id = ANY($1::bigint[]) "
                "AND state = 'succeeded'",
                others,
            )
            return bool(n == len(others))

        await wait_until(others_done, timeout=30, what="the other jobs, beside the lock")
        state = await pool.fetchval("SELECT state FROM outbox_jobs WHERE id = $1", locked)
        assert state == "running"  # its outcome still waits for the lock
        assert [e["job_id"] for e in log_events(worker, "outcome_set_aside")] == [locked]
    await settle(pool, timeout=30)
    await stop_workers([worker])
    row = await pool.fetchrow("SELECT state, attempts FROM outbox_jobs WHERE id = $1", locked)
    assert (row["state"], row["attempts"]) == ("succeeded", 1)
    report = await check_invariants(pool, workers=[worker], expected_ids=[locked, *others])
    assert report.states == {"succeeded": len(others) + 1}
    assert not report.repeats
