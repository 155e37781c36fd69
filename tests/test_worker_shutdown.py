"""A worker process from start to exit, its way out: drain on SIGTERM (the jobs in flight
finish, their leases kept alive meanwhile; past the drain timeout they are released), and
burst mode, which exits once no due job is left."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import asyncpg
import pytest

from outbox_worker.db import sleep_or_stop
from tests.conftest import WorkerProcess, wait_until
from tests.faults.invariants import log_events
from tests.support import count_started, insert_sleepy, job_states
from tests.workload import EXIT_HOOKS_RAN

# ---------------------------------------------------------------------------------------------
# SIGTERM drain
# ---------------------------------------------------------------------------------------------


async def test_a_wait_cancelled_as_it_wakes_is_cancelled() -> None:
    """The services' waits end in CancelledError when cancelled in the same turn of the loop
    as their event is set. A service that ran on after its cancel (Python 3.11's
    asyncio.wait_for swallows such a cancel) kept a burst worker from ever exiting."""
    for _ in range(20):
        stop = asyncio.Event()
        waiting = asyncio.ensure_future(sleep_or_stop(stop, 10))
        await asyncio.sleep(0)
        stop.set()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting


async def test_sigterm_lets_in_flight_jobs_finish(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    w = spawn_worker("--drain-timeout-seconds", "10")
    await w.wait_for_log("worker_ready")
    ids = await insert_sleepy(pool, 3, 2.0)

    async def all_started() -> bool:
        return await count_started(pool, ids) == len(ids)

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
        return await job_states(pool) == {"succeeded": 5}

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
    ids = await insert_sleepy(pool, 3, 30.0)

    async def all_started() -> bool:
        return await count_started(pool, ids) == len(ids)

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
    ids = await insert_sleepy(pool, 2, 3.0)

    async def all_started() -> bool:
        return await count_started(pool, ids) == len(ids)

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
        return (await job_states(pool)).get("succeeded") == len(ids)

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
    assert await job_states(pool) == {"succeeded": 5, "queued": 1}
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
    assert await job_states(pool) == {}
