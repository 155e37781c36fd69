"""Job keys with a scope: one active job per key, one job per key per throttle window, and
debounced jobs; each on one enqueue, on enqueue_many and in a race of concurrent enqueues
from separate connections (some rolled back), where the unique indexes decide."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from outbox_worker import (
    ActiveKey,
    Debounce,
    InvalidOption,
    JobStateConflict,
    NewJob,
    Throttle,
    enqueue,
    enqueue_many,
)
from outbox_worker.admin import retry_dead_jobs, retry_job
from outbox_worker.keys import JobKey
from tests.support import Enqueuer


async def committed(engine: AsyncEngine, key: JobKey, args: dict[str, object]) -> tuple[int, bool]:
    async with AsyncSession(engine) as session, session.begin():
        job = await enqueue(session, "echo", args, key=key)
    return job.id, job.duplicate


async def job_row(pool: asyncpg.Pool, job_id: int) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT state, args::text AS args, run_at, run_at - now() AS due_in, dedupe_key,"
        " active_key, debounce_key, debounce_until, created_at FROM outbox_jobs WHERE id = $1",
        job_id,
    )
    assert row is not None
    return row


async def finish(pool: asyncpg.Pool, job_id: int, state: str = "succeeded") -> None:
    await pool.execute(
        "UPDATE outbox_jobs SET state = $2, attempts = 1, finished_at = now() WHERE id = $1",
        job_id,
        state,
    )


async def start(pool: asyncpg.Pool, job_id: int) -> None:
    await pool.execute(
        "UPDATE outbox_jobs SET state = 'running', attempts = 1, started_at = now(),"
        " locked_by = 'w', locked_until = now() + interval '1 minute' WHERE id = $1",
        job_id,
    )


async def test_an_active_key_allows_one_queued_or_running_job(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    first, duplicate = await committed(engine, ActiveKey("sync:7"), {"n": 1})
    assert not duplicate
    assert await committed(engine, ActiveKey("sync:7"), {"n": 2}) == (first, True)
    await start(pool, first)
    assert await committed(engine, ActiveKey("sync:7"), {"n": 3}) == (first, True)
    await finish(pool, first)
    second, duplicate = await committed(engine, ActiveKey("sync:7"), {"n": 4})
    assert (second != first, duplicate) == (True, False)
    row = await job_row(pool, second)
    assert (row["active_key"], row["dedupe_key"], json.loads(row["args"])) == (
        "sync:7",
        None,
        {"n": 4},
    )
    # A plain key of the same text is another key.
    assert (await committed(engine, "sync:7", {"n": 5}))[1] is False


async def test_a_throttled_key_allows_one_job_per_window(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    first, _ = await committed(engine, Throttle("digest", per=timedelta(hours=1)), {"n": 1})
    assert await committed(engine, Throttle("digest", per=3600), {"n": 2}) == (first, True)
    row = await job_row(pool, first)
    window = await pool.fetchval(
        "SELECT to_char(date_trunc('hour', $1::timestamptz) AT TIME ZONE 'UTC',"
        ' \'YYYY-MM-DD"T"HH24:MI:SS"Z"\')',
        row["created_at"],
    )
    assert row["dedupe_key"] == f"digest@{window}"
    # The next window takes a new job: moved back an hour, the first is of a past window.
    await pool.execute(
        "UPDATE outbox_jobs SET dedupe_key = 'digest@2000-01-01T00:00:00Z' WHERE id = $1", first
    )
    second, duplicate = await committed(engine, Throttle("digest", per=3600), {"n": 3})
    assert (second != first, duplicate) == (True, False)


async def test_a_debounced_job_takes_the_last_args_and_waits_until_quiet(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    key = Debounce("reindex:3", period=30, max_wait=31)
    first, _ = await committed(engine, key, {"n": 1})
    before = await job_row(pool, first)
    assert timedelta(seconds=29) < before["due_in"] <= timedelta(seconds=30)
    assert before["debounce_until"] - before["created_at"] == timedelta(seconds=31)
    await asyncio.sleep(1.2)
    assert await committed(engine, key, {"n": 2}) == (first, True)
    pushed = await job_row(pool, first)
    assert json.loads(pushed["args"]) == {"n": 2}
    # now + 30 s is past the first enqueue + 31 s: the start stops there.
    assert pushed["run_at"] == pushed["debounce_until"]
    # Once a worker has it, the next enqueue writes one follow-up job, and the ones after
    # that push the follow-up.
    await start(pool, first)
    follow_up, duplicate = await committed(engine, key, {"n": 3})
    assert (follow_up != first, duplicate) == (True, False)
    assert await committed(engine, key, {"n": 4}) == (follow_up, True)
    assert json.loads((await job_row(pool, follow_up))["args"]) == {"n": 4}
    assert json.loads((await job_row(pool, first))["args"]) == {"n": 2}


async def test_enqueue_many_keys_each_job_by_its_own_kind(db: Enqueuer, pool: asyncpg.Pool) -> None:
    jobs = [
        NewJob("echo", {"n": 1}, key=ActiveKey("a")),
        NewJob("echo", {"n": 2}, key=ActiveKey("a")),
        NewJob("echo", {"n": 3}, key=Throttle("t", per=60)),
        NewJob("echo", {"n": 4}, key=Throttle("t", per=60)),
        NewJob("echo", {"n": 5}, key=Debounce("d", period=10)),
        NewJob("echo", {"n": 6}, key=Debounce("d", period=10)),
        NewJob("echo", {"n": 7}, key="plain"),
        NewJob("echo", {"n": 8}),
    ]
    result = await enqueue_many(db, jobs)
    await db.commit()
    ids = [job.id for job in result]
    assert [job.duplicate for job in result] == [
        False,
        True,
        False,
        True,
        False,
        True,
        False,
        False,
    ]
    assert (ids[0] == ids[1], ids[2] == ids[3], ids[4] == ids[5]) == (True, True, True)
    assert len(set(ids)) == 5
    assert json.loads((await job_row(pool, ids[4]))["args"]) == {"n": 6}, "the later args win"
    assert result[2].dedupe_key is not None
    assert result[2].dedupe_key.startswith("t@")
    assert (result[0].active_key, result[4].debounce_key) == ("a", "d")


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (Throttle("t", per=0), "Throttle's per"),
        (Throttle("t", per=timedelta(seconds=-5)), "Throttle's per"),
        (Debounce("d", period=10, max_wait=5), "max_wait must be at least"),
        (Debounce("d", period=float("nan")), "Debounce's period"),
        (ActiveKey("x" * 513), "key"),
        (Throttle("x" * 500, per=60), "key"),
    ],
)
async def test_bad_keys_are_refused_before_any_sql(
    db: Enqueuer, pool: asyncpg.Pool, key: JobKey, message: str
) -> None:
    with pytest.raises(InvalidOption, match=message):
        await enqueue(db, "echo", {}, key=key)
    with pytest.raises(InvalidOption, match="no delay or run_at"):
        await enqueue(db, "echo", {}, key=Debounce("d", period=1), delay=5)
    with pytest.raises(InvalidOption, match="key must be"):
        await enqueue(db, "echo", {}, key=42)  # type: ignore[call-overload]
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 0


async def test_an_operator_retry_keeps_one_active_job_per_key(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    old, _ = await committed(engine, ActiveKey("k"), {"n": 1})
    await finish(pool, old, "dead")
    older, _ = await committed(engine, ActiveKey("k"), {"n": 2})
    await finish(pool, older, "dead")
    live, _ = await committed(engine, ActiveKey("k"), {"n": 3})
    async with AsyncSession(engine) as session, session.begin():
        with pytest.raises(JobStateConflict, match="held by another queued or running"):
            await retry_job(session, old)
        assert await retry_dead_jobs(session) == [], "the key is held: no dead job of it"
    await finish(pool, live)
    async with AsyncSession(engine) as session, session.begin():
        assert await retry_dead_jobs(session) == [older], "the newest dead job of the key"


# -- races: separate connections, some rolling back, the indexes decide -------------------

CALLERS = 24


@dataclass(frozen=True)
class Outcome:
    caller: int
    committed: bool
    job_id: int
    duplicate: bool


async def _caller(
    database_url: str, barrier: asyncio.Barrier, caller: int, key: JobKey, rng: random.Random
) -> Outcome:
    """Its own connection and transaction; every third caller rolls back, some after holding
    their transaction open a while."""
    conn = await asyncpg.connect(database_url)
    try:
        tx = conn.transaction()
        await tx.start()
        await barrier.wait()
        await asyncio.sleep(rng.uniform(0, 0.02))
        job = await enqueue(conn, "echo", {"caller": caller}, key=key)
        await asyncio.sleep(rng.uniform(0, 0.1) if caller % 2 else 0)
        if caller % 3 == 0:
            await tx.rollback()
        else:
            await tx.commit()
    finally:
        await conn.close()
    return Outcome(caller, caller % 3 != 0, job.id, job.duplicate)


@pytest.mark.parametrize(
    "key",
    [ActiveKey("race"), Throttle("race", per=3600), Debounce("race", period=60)],
    ids=["active", "throttle", "debounce"],
)
async def test_concurrent_enqueues_of_one_key_leave_one_job(
    database_url: str, pool: asyncpg.Pool, key: JobKey
) -> None:
    rng = random.Random(7)
    barrier = asyncio.Barrier(CALLERS)
    outcomes = await asyncio.gather(
        *(_caller(database_url, barrier, caller, key, rng) for caller in range(CALLERS))
    )
    rows = await pool.fetch("SELECT id, args::text AS args FROM outbox_jobs")
    assert len(rows) == 1, rows
    [row] = rows
    kept = [o for o in outcomes if o.committed]
    assert {o.job_id for o in kept} == {row["id"]}
    winners = [o for o in kept if not o.duplicate]
    assert len(winners) == 1
    writer = json.loads(row["args"])["caller"]
    if isinstance(key, Debounce):
        # The args of a committed enqueue: the winner's or a later duplicate's, never a
        # rolled-back one's.
        assert writer in {o.caller for o in kept}
    else:
        assert writer == winners[0].caller
    stored = {r["id"] for r in rows}
    assert not {o.job_id for o in outcomes if not o.committed and not o.duplicate} & stored


async def test_a_debounced_enqueue_waits_for_a_concurrent_one_and_pushes_its_job(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    """The second enqueue meets the first's uncommitted row: it waits, then updates it."""
    key = Debounce("late", period=60)
    async with AsyncSession(engine) as first:
        await first.execute(text("SELECT 1"))
        job = await enqueue(first, "echo", {"n": 1}, key=key)
        second = asyncio.create_task(committed(engine, key, {"n": 2}))
        await asyncio.sleep(0.3)
        assert not second.done(), "the second enqueue must wait on the first's key"
        await first.commit()
    assert await second == (job.id, True)
    assert json.loads((await job_row(pool, job.id))["args"]) == {"n": 2}
