"""Faults of the worker process itself: kill -9 again and again, SIGSTOP past the lease, and
SIGTERM in the middle of long jobs. Real processes, real PostgreSQL, and after each the whole
table is held to the invariants (tests/faults/invariants.py)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import signal
from collections.abc import Callable

import asyncpg
import pytest

from tests.conftest import WorkerProcess, wait_until
from tests.faults.harness import (
    CALM,
    FAST,
    STEADY,
    busy_pids,
    insert_jobs,
    insert_sleepy,
    kill,
    settle,
    stale_attempts_ended,
    stop_workers,
)
from tests.faults.invariants import check_invariants, log_events

# The slow tier (`make test-slow`): processes, servers and builds, minutes in all.
pytestmark = pytest.mark.slow


async def test_repeated_kill_9_loses_nothing_and_runs_nothing_twice_unexplained(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """Five times a worker is killed in the middle of a handler and replaced, while jobs keep
    coming: every job still finishes, and the only repeats are the killed attempts."""
    rng = random.Random(9)
    workers = [spawn_worker(*FAST, "--concurrency", "4") for _ in range(3)]
    for worker in workers:
        await worker.wait_for_log("worker_ready")
    expected: list[int] = []
    killed: list[int] = []

    async def enqueue_over_time() -> None:
        for _ in range(12):
            expected.extend(await insert_sleepy(pool, 4, round(rng.uniform(1.0, 1.5), 2)))
            expected.extend(await insert_jobs(pool, "echo", 2, '{"kind": "quick"}'))
            await asyncio.sleep(0.5)

    enqueuer = asyncio.create_task(enqueue_over_time())
    try:
        for _ in range(5):
            await asyncio.sleep(0.8)
            live = {w.pid: w for w in workers if w.proc.poll() is None}

            async def victims(live: dict[int, WorkerProcess] = live) -> list[int]:
                return sorted(set(await busy_pids(pool, "sleepy")) & set(live))

            pids = await wait_until(victims, timeout=20, what="a worker in the middle of a job")
            killed.append(await kill(live[rng.choice(pids)]))
            workers.append(spawn_worker(*FAST, "--concurrency", "4"))
        await asyncio.wait_for(enqueuer, timeout=30)
    finally:
        enqueuer.cancel()
        with contextlib.suppress(BaseException):
            await enqueuer

    await settle(pool, timeout=60)
    survivors = [w for w in workers if w.pid not in killed]
    assert all(w.proc.poll() is None for w in survivors)
    await stop_workers(survivors)
    report = await check_invariants(pool, workers=workers, killed=killed, expected_ids=expected)

    assert report.jobs == len(expected) == 12 * 6
    assert report.states == {"succeeded": len(expected)}
    # Each kill cut a handler short, and another worker ran that job again to the end.
    cut_short = await pool.fetch(
        "SELECT e.job_id, e.attempt, e.pid, j.state, j.attempts, "
        "  (SELECT array_agg(DISTINCT f.pid) FROM test_executions f "
        "   WHERE f.job_id = e.job_id AND f.attempt = j.attempts AND f.event = 'end') AS ended_by "
        "FROM test_executions e JOIN outbox_jobs j ON j.id = e.job_id "
        "WHERE e.pid = ANY($1::int[]) GROUP BY e.job_id, e.attempt, e.pid, j.state, j.attempts "
        "HAVING bool_or(e.event = 'start') AND NOT bool_or(e.event = 'end')",
        killed,
    )
    assert {r["pid"] for r in cut_short} == set(killed)
    for row in cut_short:
        assert row["state"] == "succeeded", dict(row)
        assert row["attempts"] > row["attempt"], dict(row)
        assert row["ended_by"], dict(row)
        assert row["pid"] not in row["ended_by"], dict(row)
    assert report.repeats["crash"] >= len(cut_short)
    assert [e for w in survivors for e in log_events(w, "job_rescued")]


async def _runs_them(pool: asyncpg.Pool, pid: int, jobs: list[int]) -> bool:
    return sorted((await busy_pids(pool)).get(pid, [])) == sorted(jobs)


async def _rows(pool: asyncpg.Pool, ids: list[int]) -> dict[int, dict[str, object]]:
    rows = await pool.fetch(
        "SELECT id, state, attempts, result::text AS result, last_error, finished_at, "
        "locked_by, locked_until FROM outbox_jobs WHERE id = ANY($1::bigint[])",
        ids,
    )
    return {r["id"]: dict(r) for r in rows}


async def test_sigstop_past_the_lease_twice_late_completions_change_nothing(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """A worker frozen with jobs in flight, twice: its jobs are rescued and finished by
    others; when it wakes, its handlers end and their completions are refused by the fence,
    or its lease guard stops them first. An effectively-once job it held inside its
    transaction is still written exactly once."""
    a = spawn_worker(*FAST, "--concurrency", "6")
    await a.wait_for_log("worker_ready")
    workers = [a]
    expected: list[int] = []
    stale_ends = 0
    for cycle in range(2):
        held = await insert_sleepy(pool, 4, 1.5)
        once: int = await pool.fetchval(
            "INSERT INTO outbox_jobs (task, args) VALUES ('write_once', $1::jsonb) RETURNING id",
            json.dumps({"note": f"cycle-{cycle}", "pause": 0.6}),
        )
        expected += [*held, once]

        await wait_until(
            functools.partial(_runs_them, pool, a.pid, [*held, once]),
            timeout=20,
            what="worker A to start every job",
        )
        a.signal(signal.SIGSTOP)
        try:
            # Others start only now, so that A alone took the jobs.
            others = [spawn_worker(*STEADY) for _ in range(2)]
            workers += others

            async def finished_elsewhere(jobs: list[int] = held) -> bool:
                rows = await _rows(pool, jobs)
                return all(r["state"] == "succeeded" for r in rows.values())

            await wait_until(finished_elsewhere, timeout=30, what="the others to finish A's jobs")
            before = await _rows(pool, held)
        finally:
            a.signal(signal.SIGCONT)
        assert all(r["attempts"] == 2 and r["result"] == '"slept"' for r in before.values())

        # A's handlers wake past their sleep: each either ends and its completion hits the
        # fence, or is stopped by A's lease guard first.
        await wait_until(
            functools.partial(stale_attempts_ended, a, held),
            timeout=20,
            what="A's late completions to be refused, or its handlers stopped",
        )
        refused = {e["job_id"] for e in log_events(a, "outcome_dropped_lease_lost")}
        ends = await pool.fetchval(
            "SELECT count(*) FROM test_executions WHERE pid = $1 AND event = 'end' "
            "AND attempt = 1 AND job_id = ANY($2::bigint[])",
            a.pid,
            held,
        )
        assert ends >= len(refused & set(held))  # a refused attempt did run to its end...
        assert await _rows(pool, held) == before  # ...and nothing changed either way
        stale_ends += ends
        await settle(pool, timeout=30)
        await stop_workers(others)

    assert a.proc.poll() is None, "losing leases is not a crash"
    await stop_workers([a])
    report = await check_invariants(pool, workers=workers, stalled=[a.pid], expected_ids=expected)
    assert report.states == {"succeeded": len(expected)}
    assert report.repeats["stalled"] >= 8
    # The stale attempts that ran to their end ran on while the others ran the new ones.
    assert report.overlaps >= stale_ends
    effects = await pool.fetch("SELECT job_id, note FROM test_effects ORDER BY job_id")
    assert [r["note"] for r in effects] == ["cycle-0", "cycle-1"]


async def test_sigterm_during_long_jobs_releases_them_and_they_finish_elsewhere(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """Round after round a worker is told to stop while long jobs run: short jobs finish in
    the grace period, long ones are released (the interrupted attempt counted) and finish
    on another worker. Every stopped worker exits 0 soon after the drain timeout."""
    # A lease far longer than the drain: releases, not lease expiries, must move the jobs.
    flags = (*CALM, "--concurrency", "3")
    drain = ("--drain-timeout-seconds", "0.5")
    workers = [spawn_worker(*flags, *drain) for _ in range(2)]
    for worker in workers:
        await worker.wait_for_log("worker_ready")
    expected = [*await insert_sleepy(pool, 10, 2.5), *await insert_sleepy(pool, 10, 0.2)]
    expected += await insert_jobs(pool, "echo", 10)
    terminated: list[WorkerProcess] = []

    for round_number in range(3):
        live = {w.pid: w for w in workers if w.proc.poll() is None}

        async def long_job_running(live: dict[int, WorkerProcess] = live) -> list[int]:
            # Started less than a second ago: still running when the drain timeout ends.
            rows = await pool.fetch(
                "SELECT j.locked_by FROM outbox_jobs j JOIN test_executions e "
                "ON e.job_id = j.id AND e.attempt = j.attempts AND e.event = 'start' "
                "WHERE j.state = 'running' AND j.args->>'seconds' = '2.5' "
                "AND e.at > clock_timestamp() - interval '1 second'"
            )
            pids = {int(r["locked_by"].rsplit(":", 2)[1]) for r in rows}
            return sorted(pids & set(live))

        pids = await wait_until(long_job_running, timeout=30, what="a long job to be running")
        victim = live[pids[0]]
        workers.append(spawn_worker(*flags, *drain))
        victim.signal(signal.SIGTERM)
        if round_number == 1:
            await asyncio.sleep(0.1)
            victim.signal(signal.SIGTERM)  # a second request changes nothing
        code = await asyncio.to_thread(victim.wait, 20)
        assert code == 0, victim.output()[-3000:]
        assert log_events(victim, "job_released"), victim.output()[-3000:]
        terminated.append(victim)

    await settle(pool, timeout=60)
    await stop_workers(workers)
    report = await check_invariants(pool, workers=workers, expected_ids=expected)
    assert report.states == {"succeeded": len(expected)}
    assert report.repeats["released"] >= 3
    assert set(report.repeats) == {"released"}, report.repeats
    # Every start counts, the interrupted ones too: a job's attempts are its executions.
    counted = await pool.fetch(
        "SELECT j.id, j.attempts, count(DISTINCT e.attempt) AS ran FROM outbox_jobs j "
        "JOIN test_executions e ON e.job_id = j.id GROUP BY j.id, j.attempts"
    )
    assert all(r["attempts"] == r["ran"] for r in counted), [dict(r) for r in counted]
    released = {(e["job_id"], w.pid) for w in terminated for e in log_events(w, "job_released")}
    released_ids = {job_id for job_id, _ in released}
    assert released_ids
    assert all(r["attempts"] >= 2 for r in counted if r["id"] in released_ids)
    for job_id, pid in released:
        finals = await pool.fetch(
            "SELECT DISTINCT pid FROM test_executions WHERE job_id = $1 AND event = 'end'", job_id
        )
        assert pid not in [r["pid"] for r in finals]
