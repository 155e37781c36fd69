"""A schedule ticking every second, fired by three worker processes at once: each tick is
enqueued exactly once, and neither kill -9 of workers nor a PostgreSQL restart makes one
tick twice or loses one (the default policy runs ticks up to a minute late)."""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable
from datetime import datetime, timedelta

import asyncpg
import pytest

from outbox_worker.devdb import PostgresServer
from tests.conftest import WorkerProcess
from tests.faults.harness import kill, settle, stop_workers, through_restarts
from tests.faults.invariants import log_events
from tests.support import ensure_server_up

pytestmark = pytest.mark.slow

TARGET = "tests.schedule_tasks:registry"
FLAGS = ("--lease-seconds", "2", "--poll-interval-seconds", "0.5")


async def ticks_and_runs(pool: asyncpg.Pool) -> tuple[list[datetime], dict[datetime, int]]:
    """Every tick enqueued (one per job: the tick is its run_at) and how often each ran."""
    rows = await pool.fetch(
        """
        SELECT j.run_at, j.state, j.dedupe_key,
               (SELECT count(*) FROM test_executions AS e WHERE e.job_id = j.id) AS runs
        FROM outbox_jobs AS j
        WHERE j.task = 'beat'
        ORDER BY j.run_at
        """
    )
    for row in rows:
        assert row["state"] == "succeeded", dict(row)
        assert row["dedupe_key"].startswith("every-second@")
    return [row["run_at"] for row in rows], {row["run_at"]: row["runs"] for row in rows}


def assert_every_second_once(ticks: list[datetime], at_least: int) -> None:
    assert len(ticks) == len(set(ticks)), "a tick was enqueued twice"
    assert len(ticks) >= at_least, f"only {len(ticks)} ticks"
    gaps = [(a, b) for a, b in itertools.pairwise(ticks) if b - a != timedelta(seconds=1)]
    assert gaps == [], f"ticks missing between {gaps[:5]}"


async def test_three_workers_enqueue_every_tick_of_20_seconds_once(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    workers = [spawn_worker(*FLAGS, target=TARGET) for _ in range(3)]
    for worker in workers:
        await worker.wait_for_log("worker_ready")
    await asyncio.sleep(20)
    await stop_workers(workers)
    await settle(pool, 30)
    ticks, runs = await ticks_and_runs(pool)
    assert_every_second_once(ticks, at_least=18)
    assert set(runs.values()) == {1}, "a tick's job ran more than once"
    fired_by = [len(log_events(worker, "schedule_enqueued")) for worker in workers]
    assert sum(fired_by) == len(ticks), fired_by


async def test_kill_9_and_a_postgres_restart_neither_repeat_nor_lose_a_tick(
    pg_server: PostgresServer, pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    if not pg_server.can_restart:
        pytest.skip("this PostgreSQL was given by URL and cannot be restarted from here")
    workers = [spawn_worker(*FLAGS, target=TARGET) for _ in range(3)]
    for worker in workers:
        await worker.wait_for_log("worker_ready")
    await asyncio.sleep(4)
    # Two of the three die at once; one comes back a little later.
    for worker in workers[:2]:
        await kill(worker)
    await asyncio.sleep(3)
    workers.append(spawn_worker(*FLAGS, target=TARGET))
    await asyncio.sleep(3)
    try:
        await asyncio.to_thread(pg_server.restart, "immediate", 2.0)
    finally:
        await ensure_server_up(pg_server)
    await asyncio.sleep(8)
    await stop_workers(workers)
    await through_restarts(pool, functools.partial(settle, pool, 60))
    ticks, runs = await ticks_and_runs(pool)
    # About 20 s of ticks, the 2 s the server was down among them: late, not lost.
    assert_every_second_once(ticks, at_least=17)
    assert min(runs.values()) >= 1
    missed = sum(
        event.get("skipped", 0)
        for worker in workers
        for event in log_events(worker, "schedule_ticks_missed")
    )
    assert missed == 0, "within a minute of grace the default policy skips nothing"
