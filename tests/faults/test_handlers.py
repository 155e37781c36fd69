"""Faults of the user's code: handlers that hang past their timeout (awaiting, or in a
thread), and a handler that blocks the event loop past the lease, stopping the heartbeat of
every job of its worker."""

from __future__ import annotations

import asyncio
import functools
import signal
import time
from collections.abc import Callable

import asyncpg

from tests.conftest import WorkerProcess, wait_until
from tests.faults.harness import (
    CALM,
    STEADY,
    busy_pids,
    insert_jobs,
    insert_sleepy,
    settle,
    stop_workers,
)
from tests.faults.invariants import check_invariants, log_events


async def _runs(pool: asyncpg.Pool, pid: int, jobs: list[int]) -> bool:
    return set(jobs) <= set((await busy_pids(pool)).get(pid, []))


async def test_handlers_hanging_past_their_timeout_go_dead_and_block_nothing(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    worker = spawn_worker(*CALM, "--concurrency", "2")  # the timeouts are the only fault
    await worker.wait_for_log("worker_ready")
    hanging = await insert_jobs(pool, "hangs", 4, max_attempts=2)
    in_threads = await insert_jobs(pool, "hangs_in_thread", 2, '{"seconds": 1.5}', max_attempts=2)
    quick = await insert_jobs(pool, "echo", 20)
    await settle(pool, timeout=60)
    assert worker.proc.poll() is None, worker.output()[-3000:]

    rows = await pool.fetch(
        "SELECT id, state, attempts, last_error FROM outbox_jobs WHERE id = ANY($1::bigint[])",
        [*hanging, *in_threads],
    )
    for row in rows:
        assert row["state"] == "dead", dict(row)
        assert row["attempts"] == 2, dict(row)
        assert row["last_error"].startswith("TimeoutError"), dict(row)
        assert "timeout of 0.5s" in row["last_error"], dict(row)
    ran = await pool.fetch(
        "SELECT job_id, array_agg(attempt ORDER BY attempt) AS attempts FROM test_executions "
        "WHERE job_id = ANY($1::bigint[]) GROUP BY job_id",
        [*hanging, *in_threads],
    )
    assert {r["job_id"]: r["attempts"] for r in ran} == {j: [1, 2] for j in hanging + in_threads}

    await stop_workers([worker])
    report = await check_invariants(pool, workers=[worker], expected_ids=hanging + in_threads)
    assert report.states == {"dead": len(hanging) + len(in_threads), "succeeded": len(quick)}
    assert report.repeats == {"failed": len(hanging) + len(in_threads)}


async def test_sigterm_is_not_held_up_by_a_timed_out_handlers_thread(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """The timeout gave up on the handler, but its thread sleeps on: the worker must still
    exit within its drain timeout when told to stop, not when the stray thread is done."""
    worker = spawn_worker(*CALM, "--drain-timeout-seconds", "1")
    await worker.wait_for_log("worker_ready")
    job_ids = await insert_jobs(pool, "hangs_in_thread", 1, '{"seconds": 12}', max_attempts=2)
    await settle(pool, timeout=30)  # both attempts timed out: two threads sleep on
    worker.signal(signal.SIGTERM)
    started = time.monotonic()
    code = await asyncio.to_thread(worker.wait, 30)
    took = time.monotonic() - started
    assert code == 0, worker.output()[-3000:]
    report = await check_invariants(pool, workers=[worker], expected_ids=job_ids)
    assert report.states == {"dead": 1}
    # Generous: the drain timeout is 1 s, the stray threads sleep for 12.
    assert took < 7, f"the worker took {took:.1f}s to exit after SIGTERM"


async def test_handler_blocking_the_event_loop_past_the_lease(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """The blocked worker's heartbeat cannot run: the watchdog says so, with the jobs at
    stake; another worker rescues and finishes them; the blocked worker's late completions
    change nothing, and it lives on."""
    a = spawn_worker(
        "--lease-seconds", "1.5", "--poll-interval-seconds", "0.2", "--concurrency", "3"
    )
    await a.wait_for_log("worker_ready")
    sleepers = await insert_sleepy(pool, 2, 2.0)
    await wait_until(functools.partial(_runs, pool, a.pid, sleepers), what="A to start them")
    [blocker] = await insert_jobs(pool, "blocks_loop_once", 1, '{"seconds": 6}')
    await wait_until(functools.partial(_runs, pool, a.pid, [blocker]), what="A to block")
    b = spawn_worker(*STEADY, "--concurrency", "3")
    jobs = [*sleepers, blocker]

    async def finished_by_b() -> bool:
        n = await pool.fetchval(
            "SELECT count(*) FROM outbox_jobs j WHERE j.id = ANY($1::bigint[]) "
            "AND j.state = 'succeeded' AND EXISTS (SELECT 1 FROM test_executions e "
            "WHERE e.job_id = j.id AND e.attempt = j.attempts AND e.pid = $2)",
            jobs,
            b.pid,
        )
        return bool(n == len(jobs))

    await wait_until(finished_by_b, timeout=30, what="B to finish the jobs of blocked A")
    await a.wait_for_log("event_loop_unblocked", timeout=20)

    async def refused() -> bool:
        return set(jobs) <= {e["job_id"] for e in log_events(a, "outcome_dropped_lease_lost")}

    await wait_until(refused, timeout=20, what="A's late completions to be refused")
    blocked = log_events(a, "event_loop_blocked")
    assert blocked, a.output()[-3000:]
    assert blocked[0]["level"] == "error"
    assert set(jobs) <= set(blocked[0]["jobs"]), blocked
    assert set(jobs) <= {e["job_id"] for e in log_events(b, "job_rescued")}

    await settle(pool, timeout=20)
    assert a.proc.poll() is None, a.output()[-3000:]
    await stop_workers([a, b])
    report = await check_invariants(pool, workers=[a, b], stalled=[a.pid], expected_ids=jobs)
    assert report.states == {"succeeded": len(jobs)}
    assert report.repeats["stalled"] == len(jobs)
    assert report.overlaps >= len(sleepers)  # A's sleepers ran on beside B's new attempts
    rows = await pool.fetch("SELECT attempts FROM outbox_jobs WHERE id = ANY($1::bigint[])", jobs)
    assert [r["attempts"] for r in rows] == [2] * len(jobs)
