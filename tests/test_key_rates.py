"""A queue's rate per concurrency key: at most N starts of one key's jobs in any window, across
every worker; a key at its rate is passed over while the other keys go on, and the window
slides."""

from __future__ import annotations

import asyncio
import bisect
import json
import random
import signal
from collections import defaultdict
from collections.abc import Callable

import asyncpg
import pytest

from tests.conftest import WorkerProcess
from tests.test_key_limits import QUEUE, add_jobs, claim, finish_running, ready_rows


async def rate_per_key(pool: asyncpg.Pool, limit: int, period: float, **more: int) -> None:
    columns = ", ".join(more)
    values = "".join(f", {value}" for value in more.values())
    await pool.execute(
        f"INSERT INTO outbox_queues (name, key_rate_limit, key_rate_period"
        f"{', ' + columns if columns else ''}) VALUES ($1, $2, $3{values})",
        QUEUE,
        limit,
        period,
    )


async def starts_of(pool: asyncpg.Pool) -> dict[str, int]:
    """The starts each key has in the queue's record of the window."""
    record = json.loads(await pool.fetchval("SELECT key_starts FROM outbox_queues"))
    return {key: len(starts) for key, starts in record.items()}


def counts(taken: list[tuple[str | None, int]]) -> dict[str | None, int]:
    per_key: dict[str | None, int] = defaultdict(int)
    for key, _job in taken:
        per_key[key] += 1
    return dict(per_key)


async def test_a_key_at_its_rate_is_passed_over_while_other_keys_start(pool: asyncpg.Pool) -> None:
    for key in "ABC":
        await add_jobs(pool, key, 10)
    await rate_per_key(pool, 2, 60)
    async with pool.acquire() as conn:
        assert counts(await claim(conn, 20)) == {"A": 2, "B": 2, "C": 2}
        await finish_running(pool)
        assert await claim(conn, 20) == [], "finished or not, each key started two this minute"
        await add_jobs(pool, "D", 5)
        assert counts(await claim(conn, 20)) == {"D": 2}, "a new key is not held up by the others"
    assert await starts_of(pool) == {"A": 2, "B": 2, "C": 2, "D": 2}


async def test_the_window_slides_and_lapsed_starts_are_dropped(pool: asyncpg.Pool) -> None:
    await add_jobs(pool, "A", 10)
    await add_jobs(pool, "B", 10)
    await rate_per_key(pool, 3, 60)
    await pool.execute(
        """UPDATE outbox_queues SET key_starts = jsonb_build_object(
               'A', jsonb_build_array(extract(epoch FROM now() - interval '2 minutes'),
                                      extract(epoch FROM now() - interval '61 seconds'),
                                      extract(epoch FROM now())),
               'B', jsonb_build_array(extract(epoch FROM now() - interval '5 minutes')),
               'gone', jsonb_build_array(extract(epoch FROM now() - interval '1 hour')))"""
    )
    async with pool.acquire() as conn:
        assert counts(await claim(conn, 20)) == {"A": 2, "B": 3}
    assert await starts_of(pool) == {"A": 3, "B": 3}, "a key with no start left is dropped"


async def test_a_rate_and_a_limit_per_key_both_hold(pool: asyncpg.Pool) -> None:
    await add_jobs(pool, "A", 10)
    await add_jobs(pool, "B", 10)
    await rate_per_key(pool, 3, 60, key_concurrency=1)
    async with pool.acquire() as conn:
        taken = []
        for _ in range(5):
            got = await claim(conn, 10)
            assert counts(got) in ({}, {"A": 1, "B": 1}), got
            taken.extend(got)
            await finish_running(pool)
    assert counts(taken) == {"A": 3, "B": 3}


async def test_jobs_without_a_key_count_against_no_key(pool: asyncpg.Pool) -> None:
    await add_jobs(pool, "A", 5)
    loose = await add_jobs(pool, None, 5)
    await rate_per_key(pool, 1, 60)
    async with pool.acquire() as conn:
        taken = await claim(conn, 4)
    assert counts(taken) == {"A": 1, None: 3}
    assert sorted(job for key, job in taken if key is None) == loose[:3]
    assert await starts_of(pool) == {"A": 1}


async def test_a_rate_per_key_takes_the_queue_out_of_the_ready_lanes(pool: asyncpg.Pool) -> None:
    await add_jobs(pool, "A", 20)
    assert await ready_rows(pool) == 20
    await rate_per_key(pool, 5, 1)
    assert await ready_rows(pool) == 0, "claimed key by key, through its index"
    await add_jobs(pool, "A", 3)
    assert await ready_rows(pool) == 0
    await pool.execute("UPDATE outbox_queues SET key_rate_limit = NULL")
    assert await ready_rows(pool) == 23


async def test_claims_racing_on_many_connections_never_pass_a_key_s_rate(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """Eight connections claim at once; the starts of each key, as the jobs record them,
    stay within the rate in the window, whichever claim waited on which."""
    keys, per_key, rate = ["A", "B", "C"], 30, 4
    for key in keys:
        await add_jobs(pool, key, per_key)
    await rate_per_key(pool, rate, 3600)
    rng = random.Random(11)

    async def claimer(n: int) -> None:
        conn = await asyncpg.connect(database_url)
        try:
            for _ in range(6):
                await claim(conn, rng.randint(1, 5))
                await asyncio.sleep(rng.choice([0, 0.001, 0.003]))
        finally:
            await conn.close()

    await asyncio.gather(*(claimer(n) for n in range(8)))
    started = await pool.fetch(
        "SELECT concurrency_key AS key, count(*) AS n FROM outbox_jobs WHERE attempts > 0 "
        "GROUP BY concurrency_key"
    )
    assert {row["key"]: row["n"] for row in started} == dict.fromkeys(keys, rate)


@pytest.mark.slow
async def test_three_workers_hold_each_key_to_its_rate(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """Two keys with deep backlogs and a third with a trickle, 10 starts a second per key:
    each busy key starts about 10 a second over 12 seconds, no second holds more than the
    rate and a claim of one worker's slots, and the trickle's jobs are not held up."""
    rate, seconds, slots = 10, 12, 20
    await rate_per_key(pool, rate, 1)
    workers = [spawn_worker("--concurrency", str(slots), "--queues", QUEUE) for _ in range(3)]
    for worker in workers:
        await worker.wait_for_log('"worker_ready"')
    for key in ("A", "B"):
        await add_jobs(pool, key, rate * seconds * 3)
    trickle = []
    for _ in range(seconds):
        trickle.extend(await add_jobs(pool, "C", 1))
        await asyncio.sleep(1)
    await asyncio.sleep(2)
    for worker in workers:
        worker.signal(signal.SIGTERM)
    assert [worker.wait() for worker in workers] == [0, 0, 0]
    rows = await pool.fetch(
        "SELECT concurrency_key AS key, started_at FROM outbox_jobs WHERE attempts > 0"
    )
    starts: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        starts[row["key"]].append(row["started_at"].timestamp())
    for key in ("A", "B"):
        times = sorted(starts[key])
        in_window = [t for t in times if t < times[0] + seconds]
        assert abs(len(in_window) - rate * seconds) <= rate * seconds * 0.1, (key, len(in_window))
        busiest = max(bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times))
        assert busiest <= rate + slots, f"{busiest} starts of {key} within one second"
    done = await pool.fetchval(
        "SELECT count(*) FROM outbox_jobs WHERE id = ANY($1::bigint[]) AND attempts > 0", trickle
    )
    assert done == len(trickle), "the trickle's jobs waited behind the busy keys"
