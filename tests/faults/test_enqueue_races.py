"""Many callers enqueue the same keys at the same moment, some rolling back, while workers
claim and finish those very jobs: one job per key, each run once."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from outbox_worker import NewJob, enqueue, enqueue_many
from tests.conftest import WorkerProcess
from tests.faults.harness import CALM, settle, stop_workers
from tests.faults.invariants import check_invariants
from tests.support import Enqueuer

# The slow tier (`make test-slow`): processes, servers and builds, minutes in all.
pytestmark = pytest.mark.slow

CALLERS = 8
ROUNDS = 6
SHARED = "race-shared"  # enqueued in every round: after the first, its job is running or done


@dataclass(frozen=True)
class Call:
    caller: int
    committed: bool
    jobs: dict[str, tuple[int, bool]]  # key -> (job id, duplicate)


async def _caller(
    engine: AsyncEngine, barrier: asyncio.Barrier, caller: int, keys: list[str], seed: int
) -> Call:
    """One client on its own connection and transaction; every third one rolls back."""
    rng = random.Random(seed)
    executor: Enqueuer
    async with AsyncSession(engine) if caller % 2 else engine.connect() as executor:
        await executor.execute(text("SELECT 1"))  # connection and transaction are open
        await barrier.wait()
        await asyncio.sleep(rng.uniform(0, 0.02))
        # Keys in one order for everyone: opposite orders may deadlock, as any two
        # transactions inserting the same unique values in opposite orders do.
        if caller % 4 == 3:
            jobs = await enqueue_many(
                executor, [NewJob("echo", {"caller": caller}, key=k) for k in keys]
            )
        else:
            jobs = [await enqueue(executor, "echo", {"caller": caller}, key=k) for k in keys]
        await asyncio.sleep(rng.uniform(0, 0.1))
        committed = caller % 3 != 0
        if committed:
            await executor.commit()
        else:
            await executor.rollback()
    return Call(
        caller, committed, {k: (j.id, j.duplicate) for k, j in zip(keys, jobs, strict=True)}
    )


async def test_same_key_enqueues_with_rollbacks_while_workers_run(
    engine: AsyncEngine, pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    # Long leases: no fault here but the races, so nothing may run twice.
    workers = [spawn_worker(*CALM, "--concurrency", "4") for _ in range(2)]
    for worker in workers:
        await worker.wait_for_log("worker_ready")
    winners: dict[str, int] = {}
    for round_number in range(ROUNDS):
        keys = sorted([f"race-{round_number}", SHARED])
        barrier = asyncio.Barrier(CALLERS)
        calls = await asyncio.gather(
            *(
                _caller(engine, barrier, caller, keys, seed=round_number * 100 + caller)
                for caller in range(CALLERS)
            )
        )
        for key in keys:
            rows = await pool.fetch(
                "SELECT id, args->>'caller' AS caller FROM outbox_jobs "
                "WHERE task = 'echo' AND dedupe_key = $1",
                key,
            )
            assert len(rows) == 1, f"{len(rows)} jobs for key {key}"
            [row] = rows
            committed = [c.jobs[key] for c in calls if c.committed]
            # Every caller that committed holds the one job, new or duplicate...
            assert {job_id for job_id, _ in committed} == {row["id"]}
            # ...and the job is the args of the one committed caller that created it.
            created = [c.caller for c in calls if c.committed and not c.jobs[key][1]]
            if key in winners:
                assert created == [], "a key that already had a job got a second one"
                assert row["id"] == winners[key]
            else:
                assert created == [int(row["caller"])]
                winners[key] = row["id"]
        # Rolled-back inserts left nothing behind.
        rolled_back = {c.jobs[k][0] for c in calls if not c.committed for k in keys}
        stored = {r["id"] for r in await pool.fetch("SELECT id FROM outbox_jobs")}
        assert not (rolled_back - set(winners.values())) & stored

    await settle(pool, timeout=30)
    await stop_workers(workers)
    report = await check_invariants(pool, workers=workers, expected_ids=list(winners.values()))
    assert report.jobs == ROUNDS + 1
    assert report.states == {"succeeded": ROUNDS + 1}
    assert report.executions == ROUNDS + 1  # each job ran once, though enqueued again and again
    assert not report.repeats


async def test_enqueue_many_of_the_same_keys_in_opposite_orders_does_not_deadlock(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    """Two requests enqueue the same batch of keyed jobs, listed in different orders. A
    batch is one statement of the library's: its order of inserts is the library's to choose,
    and a consistent one cannot deadlock."""
    keys = [f"batch-{n}" for n in range(1000)]
    for attempt in range(5):
        barrier = asyncio.Barrier(2)
        first, second = await asyncio.gather(
            _batch(engine, barrier, keys, attempt), _batch(engine, barrier, keys[::-1], attempt)
        )
        assert first == second[::-1]
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == len(keys) * 5


async def _batch(
    engine: AsyncEngine, barrier: asyncio.Barrier, keys: list[str], attempt: int
) -> list[int]:
    async with AsyncSession(engine) as session:
        await session.execute(text("SELECT 1"))
        await barrier.wait()
        jobs = await enqueue_many(
            session, [NewJob("echo", {"n": attempt}, key=f"{k}-{attempt}") for k in keys]
        )
        await asyncio.sleep(0.05)
        await session.commit()
    return [j.id for j in jobs]
