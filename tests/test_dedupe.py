"""Unique job keys: at most one row per (task, dedupe_key), decided by the unique index."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from outbox_worker import JobState, NewJob, enqueue, enqueue_many
from tests.support import Enqueuer


async def rows_for(pool: asyncpg.Pool, task: str, key: str) -> list[asyncpg.Record]:
    return list(
        await pool.fetch(
            "SELECT id, task, dedupe_key, args::text AS args_text FROM outbox_jobs "
            "WHERE task = $1 AND dedupe_key = $2 ORDER BY id",
            task,
            key,
        )
    )


async def all_ids(pool: asyncpg.Pool) -> list[int]:
    return [r["id"] for r in await pool.fetch("SELECT id FROM outbox_jobs ORDER BY id")]


# ---------------------------------------------------------------------------------------------
# enqueue
# ---------------------------------------------------------------------------------------------


async def test_same_key_twice_in_one_transaction(db: Enqueuer, pool: asyncpg.Pool) -> None:
    first = await enqueue(db, "echo", {"n": 1}, key="order-1")
    second = await enqueue(db, "echo", {"n": 2}, key="order-1")
    await db.commit()

    assert first.duplicate is False
    assert second.duplicate is True
    assert second.id == first.id
    assert first.dedupe_key == second.dedupe_key == "order-1"
    assert second.args == {"n": 1}  # the existing job, not the refused one
    rows = await rows_for(pool, "echo", "order-1")
    assert [r["id"] for r in rows] == [first.id]
    assert json.loads(rows[0]["args_text"]) == {"n": 1}
    assert await all_ids(pool) == [first.id]


async def test_same_key_in_a_later_transaction(db: Enqueuer, pool: asyncpg.Pool) -> None:
    first = await enqueue(db, "echo", {"n": 1}, key="order-2", priority=3)
    await db.commit()
    second = await enqueue(db, "echo", {"n": 2}, key="order-2", priority=9, queue="other")
    await db.commit()

    assert (first.duplicate, second.duplicate) == (False, True)
    assert second.id == first.id
    # The returned job is the stored row, not the options of the refused call.
    assert (second.priority, second.queue, second.args) == (3, "default", {"n": 1})
    assert await all_ids(pool) == [first.id]


async def test_key_is_scoped_to_the_task(db: Enqueuer, pool: asyncpg.Pool) -> None:
    echo = await enqueue(db, "echo", key="shared")
    noop = await enqueue(db, "noop", key="shared")
    await db.commit()
    assert echo.id != noop.id
    assert (echo.duplicate, noop.duplicate) == (False, False)
    assert (echo.dedupe_key, noop.dedupe_key) == ("shared", "shared")
    assert [r["id"] for r in await rows_for(pool, "echo", "shared")] == [echo.id]
    assert [r["id"] for r in await rows_for(pool, "noop", "shared")] == [noop.id]


async def test_without_key_every_enqueue_is_a_job(db: Enqueuer, pool: asyncpg.Pool) -> None:
    jobs = [await enqueue(db, "echo", {"n": 1}) for _ in range(3)]
    await db.commit()
    assert [j.dedupe_key for j in jobs] == [None, None, None]
    assert [j.duplicate for j in jobs] == [False, False, False]
    assert len({j.id for j in jobs}) == 3
    assert await all_ids(pool) == [j.id for j in jobs]


async def test_key_is_stored_as_dedupe_key(db: Enqueuer, pool: asyncpg.Pool) -> None:
    key = "tenant:7/o'rder; DROP TABLE outbox_jobs; -- ✓"
    job = await enqueue(db, "echo", key=key)
    await db.commit()
    assert job.dedupe_key == key
    assert await pool.fetchval("SELECT dedupe_key FROM outbox_jobs WHERE id = $1", job.id) == key
    # It dedupes byte for byte: a key that differs only in case is another job.
    other = await enqueue(db, "echo", key=key.upper())
    again = await enqueue(db, "echo", key=key)
    await db.commit()
    assert (other.duplicate, again.duplicate) == (False, True)
    assert again.id == job.id
    assert await all_ids(pool) == [job.id, other.id]


async def test_rolled_back_key_can_be_used_again(db: Enqueuer, pool: asyncpg.Pool) -> None:
    gone = await enqueue(db, "echo", {"n": 1}, key="retry-me")
    await db.rollback()
    kept = await enqueue(db, "echo", {"n": 2}, key="retry-me")
    await db.commit()
    assert kept.duplicate is False
    assert kept.id != gone.id
    rows = await rows_for(pool, "echo", "retry-me")
    assert [r["id"] for r in rows] == [kept.id]
    assert json.loads(rows[0]["args_text"]) == {"n": 2}


async def test_key_of_a_finished_job_still_dedupes(db: Enqueuer, pool: asyncpg.Pool) -> None:
    first = await enqueue(db, "echo", key="done-once")
    await db.commit()
    await pool.execute(
        "UPDATE outbox_jobs SET state = 'succeeded', attempts = 1, finished_at = now() "
        "WHERE id = $1",
        first.id,
    )
    second = await enqueue(db, "echo", key="done-once")
    await db.commit()
    assert second.duplicate is True
    assert second.id == first.id
    assert second.state is JobState.SUCCEEDED
    assert second.attempts == 1
    assert await all_ids(pool) == [first.id]


async def test_plain_sql_insert_with_a_taken_key_is_refused(
    db: Enqueuer, pool: asyncpg.Pool
) -> None:
    job = await enqueue(db, "echo", key="sql-key")
    await db.commit()
    with pytest.raises(asyncpg.UniqueViolationError):
        await pool.execute("INSERT INTO outbox_jobs (task, dedupe_key) VALUES ('echo', 'sql-key')")
    assert await all_ids(pool) == [job.id]


# ---------------------------------------------------------------------------------------------
# enqueue_many
# ---------------------------------------------------------------------------------------------


async def test_enqueue_many_with_a_key_already_in_the_table(
    db: Enqueuer, pool: asyncpg.Pool
) -> None:
    existing = await enqueue(db, "echo", {"from": "before"}, key="a")
    await db.commit()
    jobs = await enqueue_many(
        db,
        [
            NewJob("echo", {"i": 0}, key="b"),
            NewJob("echo", {"i": 1}, key="a"),
            NewJob("noop", key="a"),
            NewJob("echo", {"i": 3}),
        ],
    )
    await db.commit()

    assert [j.duplicate for j in jobs] == [False, True, False, False]
    assert jobs[1].id == existing.id
    assert jobs[1].args == {"from": "before"}
    assert [j.task for j in jobs] == ["echo", "echo", "noop", "echo"]
    assert [j.dedupe_key for j in jobs] == ["b", "a", "a", None]
    assert len({jobs[0].id, existing.id, jobs[2].id, jobs[3].id}) == 4
    assert await all_ids(pool) == sorted([existing.id, jobs[0].id, jobs[2].id, jobs[3].id])
    assert [r["id"] for r in await rows_for(pool, "echo", "a")] == [existing.id]


async def test_enqueue_many_with_the_same_key_twice_in_one_call(
    db: Enqueuer, pool: asyncpg.Pool
) -> None:
    jobs = await enqueue_many(
        db,
        [
            NewJob("echo", {"i": 0}, key="x"),
            NewJob("echo", {"i": 1}),
            NewJob("echo", {"i": 2}, key="x"),
            NewJob("echo", {"i": 3}, key="y"),
            NewJob("echo", {"i": 4}, key="x"),
            NewJob("echo", {"i": 5}, key="y"),
        ],
    )
    await db.commit()

    assert [j.duplicate for j in jobs] == [False, False, True, False, True, True]
    assert jobs[2].id == jobs[4].id == jobs[0].id
    assert jobs[5].id == jobs[3].id
    # The first wins: the later ones return its row.
    assert [j.args["i"] for j in jobs] == [0, 1, 0, 3, 0, 3]
    assert await all_ids(pool) == [jobs[0].id, jobs[1].id, jobs[3].id]
    [row_x] = await rows_for(pool, "echo", "x")
    assert json.loads(row_x["args_text"]) == {"i": 0}


async def test_enqueue_then_enqueue_many_in_one_transaction(
    db: Enqueuer, pool: asyncpg.Pool
) -> None:
    single = await enqueue(db, "echo", {"i": "single"}, key="k")
    [dup, new] = await enqueue_many(db, [NewJob("echo", key="k"), NewJob("echo", key="k2")])
    again = await enqueue(db, "echo", key="k2")
    await db.commit()
    assert (dup.duplicate, dup.id, dup.args) == (True, single.id, {"i": "single"})
    assert (new.duplicate, again.duplicate, again.id) == (False, True, new.id)
    assert await all_ids(pool) == [single.id, new.id]


async def test_enqueue_many_all_duplicates_rolled_back(db: Enqueuer, pool: asyncpg.Pool) -> None:
    existing = await enqueue(db, "echo", key="only")
    await db.commit()
    jobs = await enqueue_many(db, [NewJob("echo", key="only"), NewJob("noop", key="fresh")])
    assert [j.duplicate for j in jobs] == [True, False]
    await db.rollback()
    assert await all_ids(pool) == [existing.id]


# ---------------------------------------------------------------------------------------------
# Concurrent same-key enqueues, some of which roll back: the unique index decides
# ---------------------------------------------------------------------------------------------

CALLERS = 40


@dataclass(frozen=True)
class Outcome:
    caller: int
    committed: bool
    job_id: int
    duplicate: bool


async def _caller(
    engine: AsyncEngine,
    barrier: asyncio.Barrier,
    caller: int,
    key: str,
    rng: random.Random,
) -> Outcome:
    """One client on its own connection and transaction.

    Caller 0 inserts before the others start and rolls back after they are all waiting on
    its row. Every third caller rolls back, half of those after holding their transaction
    open a while; the rest commit, some after a pause.
    """
    rolls_back = caller % 3 == 0
    hold = rng.uniform(0.01, 0.15) if caller % 2 == 0 else 0.0
    executor: Enqueuer
    async with AsyncSession(engine) if caller % 2 else engine.connect() as executor:
        await executor.execute(text("SELECT 1"))  # the connection and its transaction are open
        if caller == 0:
            job = await enqueue(executor, "echo", {"caller": caller}, key=key)
            await barrier.wait()
            await asyncio.sleep(0.3)
        else:
            await barrier.wait()
            await asyncio.sleep(rng.uniform(0, 0.02))
            job = await enqueue(executor, "echo", {"caller": caller}, key=key)
            await asyncio.sleep(hold)
        if rolls_back:
            await executor.rollback()
        else:
            await executor.commit()
    return Outcome(caller, not rolls_back, job.id, job.duplicate)


@pytest.mark.parametrize("round_number", [1, 2, 3])
async def test_concurrent_same_key_enqueues_make_exactly_one_job(
    engine: AsyncEngine, pool: asyncpg.Pool, round_number: int
) -> None:
    rng = random.Random(round_number)
    for attempt in range(3):
        key = f"race-{round_number}-{attempt}"
        barrier = asyncio.Barrier(CALLERS)
        outcomes = await asyncio.gather(
            *(_caller(engine, barrier, caller, key, rng) for caller in range(CALLERS))
        )

        rows = await rows_for(pool, "echo", key)
        assert len(rows) == 1, f"{len(rows)} rows for key {key}"
        [row] = rows
        committed = [o for o in outcomes if o.committed]
        rolled_back = [o for o in outcomes if not o.committed]
        assert len(rolled_back) == len(range(0, CALLERS, 3))
        assert committed
        # Every committed caller got the one job, new or duplicate.
        assert {o.job_id for o in committed} == {row["id"]}
        winners = [o for o in committed if not o.duplicate]
        assert len(winners) == 1
        assert json.loads(row["args_text"]) == {"caller": winners[0].caller}
        # Caller 0 inserted first and rolled back: its row is gone, and it was not the one.
        first = outcomes[0]
        assert (first.caller, first.committed, first.duplicate) == (0, False, False)
        assert first.job_id != row["id"]
        # No rolled-back insert left a row behind.
        inserted_and_rolled_back = {o.job_id for o in rolled_back if not o.duplicate}
        stored = set(await all_ids(pool))
        assert not inserted_and_rolled_back & stored

    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 3
