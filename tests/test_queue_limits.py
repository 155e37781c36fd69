"""A queue's concurrency limit and pause, as every worker obeys them: exact across claims
racing on separate connections and across worker processes, counted from live leases (a
killed worker's jobs stop counting when their leases lapse), in force within one poll
interval of a change made by plain SQL."""

from __future__ import annotations

import asyncio
import bisect
import random
import signal
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg
import pytest
import structlog

from outbox_worker import sql
from outbox_worker._worker.claimer import Claimer
from outbox_worker._worker.outcomes import Succeeded
from outbox_worker._worker.slots import Slots
from tests.conftest import WorkerProcess, wait_until
from tests.support import insert_sleepy

LIMITED = "slow"  # the workload's sleepy task runs on this queue


async def claim_limited(
    conn: asyncpg.Connection, limit: int, worker: str = "w", ahead: int = 0
) -> list[int]:
    rows = await conn.fetch(
        *sql.bind(
            sql.JOB_CLAIM_LIMITED,
            queue=LIMITED,
            limit=limit,
            ahead=ahead,
            worker_id=worker,
            lease_seconds=30,
        )
    )
    return [row["id"] for row in rows]


async def finish(pool: asyncpg.Pool, job_ids: list[int]) -> None:
    await pool.execute(
        "UPDATE outbox_jobs SET state = 'succeeded', finished_at = now(), locked_by = NULL, "
        "locked_until = NULL WHERE id = ANY($1::bigint[])",
        job_ids,
    )


async def running(pool: asyncpg.Pool) -> int:
    n: int = await pool.fetchval(
        "SELECT count(*) FROM outbox_jobs WHERE queue = $1 AND state = 'running'", LIMITED
    )
    return n


def most_at_once(spans: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one instant (an end before a start at the same instant)."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


async def handler_spans(pool: asyncpg.Pool) -> list[tuple[datetime, datetime]]:
    rows = await pool.fetch(
        "SELECT s.at AS started, e.at AS ended FROM test_executions AS s "
        "JOIN test_executions AS e USING (job_id, attempt) "
        "WHERE s.event = 'start' AND e.event = 'end'"
    )
    return [(row["started"], row["ended"]) for row in rows]


async def test_a_claim_takes_what_the_limit_leaves_and_a_finished_job_frees_its_place(
    pool: asyncpg.Pool,
) -> None:
    await insert_sleepy(pool, 10, 1.0)
    await pool.execute("INSERT INTO outbox_queues (name, concurrency) VALUES ($1, 3)", LIMITED)
    async with pool.acquire() as conn:
        first = await claim_limited(conn, 10)
        assert len(first) == 3
        assert await claim_limited(conn, 10) == []
        await finish(pool, first[:1])
        third = await claim_limited(conn, 10)
        assert len(third) == 1
        held = await pool.fetchval("SELECT held_ids FROM outbox_queues WHERE name = $1", LIMITED)
        assert sorted(held) == sorted([*first[1:], *third])


async def test_jobs_claimed_ahead_take_only_the_half_of_the_limit_free_slots_would_not(
    pool: asyncpg.Pool,
) -> None:
    """A claim for 2 free slots and 6 ahead, under a limit of 10 with nothing running: the 2,
    and 3 ahead (10 - 2 - 10 / 2); once 5 run, only what free slots ask for."""
    await insert_sleepy(pool, 20, 1.0)
    await pool.execute("INSERT INTO outbox_queues (name, concurrency) VALUES ($1, 10)", LIMITED)
    async with pool.acquire() as conn:
        assert len(await claim_limited(conn, 8, ahead=6)) == 5
        assert len(await claim_limited(conn, 8, ahead=6)) == 2
        assert len(await claim_limited(conn, 8, ahead=6)) == 2
        assert len(await claim_limited(conn, 8, ahead=6)) == 1


async def test_a_lapsed_lease_stops_counting_and_a_lifted_limit_claims_freely(
    pool: asyncpg.Pool,
) -> None:
    await insert_sleepy(pool, 10, 1.0)
    await pool.execute("INSERT INTO outbox_queues (name, concurrency) VALUES ($1, 2)", LIMITED)
    async with pool.acquire() as conn:
        assert len(await claim_limited(conn, 10)) == 2
        # The worker that held them died: nobody extends their leases.
        await pool.execute(
            "UPDATE outbox_jobs SET locked_until = now() - interval '1 second' "
            "WHERE state = 'running'"
        )
        assert len(await claim_limited(conn, 10)) == 2
        await pool.execute("UPDATE outbox_queues SET concurrency = NULL")
        assert len(await claim_limited(conn, 10)) == 6


async def test_a_listed_job_this_claim_cannot_see_counts_until_its_lease_would_end(
    pool: asyncpg.Pool,
) -> None:
    """A claim that waited on the queue's row while a job was enqueued and claimed by
    another finds it listed but absent from its older snapshot: it still counts."""
    await insert_sleepy(pool, 3, 1.0)
    await pool.execute("INSERT INTO outbox_queues (name, concurrency) VALUES ($1, 1)", LIMITED)
    await pool.execute(
        "UPDATE outbox_queues SET held_ids = '{999999}', held_attempts = '{1}', "
        "held_until = ARRAY[now() + interval '30 seconds']"
    )
    async with pool.acquire() as conn:
        assert await claim_limited(conn, 10) == []
        await pool.execute(
            "UPDATE outbox_queues SET held_until = ARRAY[now() - interval '1 second']"
        )
        assert len(await claim_limited(conn, 10)) == 1


async def test_a_batch_of_successes_claims_the_places_it_frees(pool: asyncpg.Pool) -> None:
    """The jobs a statement writes successes for finish when it commits: its claim may take
    their places under the limit, and they leave the queue's list."""
    await insert_sleepy(pool, 10, 1.0)
    await pool.execute("INSERT INTO outbox_queues (name, concurrency) VALUES ($1, 3)", LIMITED)
    async with pool.acquire() as conn:
        first = await claim_limited(conn, 10)
        rows = await conn.fetch(
            *sql.bind(
                sql.JOB_COMPLETE_AND_CLAIM_LIMITED,
                queue=LIMITED,
                limit=10,
                ahead=0,
                worker_id="w",
                lease_seconds=30,
                ids=first[:2],
                attempts=[1, 1],
                results=[None, None],
            )
        )
    assert sorted(r["id"] for r in rows if not r["claimed"]) == first[:2]
    claimed = [r["id"] for r in rows if r["claimed"]]
    assert len(claimed) == 2
    held = await pool.fetchval("SELECT held_ids FROM outbox_queues WHERE name = $1", LIMITED)
    assert sorted(held) == sorted([first[2], *claimed])


def limited_claimer(pool: asyncpg.Pool, slots: int) -> tuple[Claimer, Slots]:
    """A claimer of the limited queue whose claimed jobs are held but never run."""
    held = Slots(slots, ahead=slots, log=structlog.get_logger("test"))
    claimer = Claimer(
        pool=pool,
        worker_id="w",
        queues=[LIMITED],
        lease_seconds=30,
        slots=held,
        start=held.hold,
        log=structlog.get_logger("test"),
    )
    claimer.limited = frozenset({LIMITED})
    return claimer, held


async def claim_waiting_on_the_queue_row(
    pool: asyncpg.Pool, claim: Awaitable[Any]
) -> asyncio.Task[Any]:
    """Start a claim that waits on the queue's row, locked by another transaction."""
    task = asyncio.ensure_future(claim)
    await wait_until(
        lambda: pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%gate AS MATERIALIZED%'"
        ),
        what="the claim waiting on the queue's row",
    )
    return task


async def test_a_worker_never_waits_on_its_own_claim_of_a_limited_queue(
    pool: asyncpg.Pool,
) -> None:
    """While one path's claim of a limited queue is in flight, the other does not claim it
    too (it would only wait on the row the first holds): the completer writes its
    successes alone, the producer leaves the queue out."""
    await insert_sleepy(pool, 2, 1.0)
    await pool.execute("INSERT INTO outbox_queues (name, concurrency) VALUES ($1, 10)", LIMITED)
    claimer, slots = limited_claimer(pool, 4)
    assert await claimer.claim() == (4, 2)
    await insert_sleepy(pool, 10, 1.0)
    first, second = sorted(slots.held)
    async with pool.acquire() as locker:
        async with locker.transaction():
            await locker.execute("SELECT 1 FROM outbox_queues WHERE name = $1 FOR UPDATE", LIMITED)
            producing = await claim_waiting_on_the_queue_row(pool, claimer.claim())
            written = await asyncio.wait_for(
                claimer.complete_and_claim([Succeeded(first, 1, None)]), 10
            )
            assert [r["id"] for r in written] == [first]
            assert not producing.done()
        assert await producing == (2, 2)
        assert len(slots.held) == 4

        async with locker.transaction():
            await locker.execute("SELECT 1 FROM outbox_queues WHERE name = $1 FOR UPDATE", LIMITED)
            completing = await claim_waiting_on_the_queue_row(
                pool, claimer.complete_and_claim([Succeeded(second, 1, None)])
            )
            # Claiming ahead has become worth it: the producer has rows to ask for.
            slots.job_seconds = slots.trip_seconds = 1.0
            assert await asyncio.wait_for(claimer.claim(), 10) == (0, 0)
        assert [r["id"] for r in await completing] == [second]
    states = await pool.fetch(
        "SELECT state FROM outbox_jobs WHERE id = ANY($1::bigint[])", [first, second]
    )
    assert [r["state"] for r in states] == ["succeeded", "succeeded"]


async def test_a_rate_limit_counts_the_starts_of_the_last_window(pool: asyncpg.Pool) -> None:
    await insert_sleepy(pool, 20, 1.0)
    await pool.execute(
        "INSERT INTO outbox_queues (name, rate_limit, rate_period) VALUES ($1, 3, 60)", LIMITED
    )
    async with pool.acquire() as conn:
        assert len(await claim_limited(conn, 10)) == 3
        await finish(
            pool,
            [
                row["id"]
                for row in await pool.fetch("SELECT id FROM outbox_jobs WHERE state = 'running'")
            ],
        )
        assert await claim_limited(conn, 10) == [], "finished or not, three started this minute"
        # Two of the starts fall out of the window.
        await pool.execute(
            "UPDATE outbox_queues SET rate_starts = ARRAY["
            "now() - interval '2 minutes', now() - interval '61 seconds', now()]"
        )
        assert len(await claim_limited(conn, 10)) == 2
        starts = await pool.fetchval("SELECT cardinality(rate_starts) FROM outbox_queues")
        assert starts == 3, "the lapsed starts are dropped, the new ones kept"


async def test_a_paused_queue_claims_nothing_on_either_path(pool: asyncpg.Pool) -> None:
    await insert_sleepy(pool, 4, 1.0)
    await pool.execute("INSERT INTO outbox_queues (name, paused_at) VALUES ($1, now())", LIMITED)
    async with pool.acquire() as conn:
        assert await claim_limited(conn, 10) == []
        rows = await conn.fetch(
            *sql.bind(
                sql.JOB_CLAIM,
                queues=[LIMITED],
                limit=10,
                ahead=0,
                worker_id="w",
                lease_seconds=30,
            )
        )
        assert rows == []
        await pool.execute("UPDATE outbox_queues SET paused_at = NULL")
        assert len(await claim_limited(conn, 10)) == 4


async def test_a_limit_set_while_jobs_run_counts_them(pool: asyncpg.Pool) -> None:
    """Jobs claimed before the queue had a limit (by the unlimited claim) count against it."""
    await insert_sleepy(pool, 10, 1.0)
    async with pool.acquire() as conn:
        before = await conn.fetch(
            *sql.bind(
                sql.JOB_CLAIM, queues=[LIMITED], limit=4, ahead=0, worker_id="w", lease_seconds=30
            )
        )
        assert len(before) == 4
        await pool.execute("INSERT INTO outbox_queues (name, concurrency) VALUES ($1, 5)", LIMITED)
        assert len(await claim_limited(conn, 10)) == 1
        # The unlimited claim leaves a limited queue alone.
        rows = await conn.fetch(
            *sql.bind(
                sql.JOB_CLAIM, queues=[LIMITED], limit=4, ahead=0, worker_id="w", lease_seconds=30
            )
        )
        assert rows == []


async def test_claims_racing_on_many_connections_never_pass_the_limit(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """Eight connections claim and finish as fast as they can; after every claim, the jobs
    running never exceed the limit, and the limit is reached."""
    limit, total = 4, 400
    await insert_sleepy(pool, total, 0.0)
    await pool.execute(
        "INSERT INTO outbox_queues (name, concurrency) VALUES ($1, $2)", LIMITED, limit
    )
    seen: list[int] = []
    rng = random.Random(7)

    async def claimer(n: int) -> None:
        conn = await asyncpg.connect(database_url)
        try:
            while True:
                got = await claim_limited(conn, rng.randint(1, 3), worker=f"w{n}")
                seen.append(await running(pool))
                if got:
                    await asyncio.sleep(rng.choice([0, 0.001, 0.003]))
                    await finish(pool, got)
                elif not await pool.fetchval(
                    "SELECT count(*) FROM outbox_jobs WHERE state = 'queued'"
                ):
                    return
                else:
                    await asyncio.sleep(0.001)
        finally:
            await conn.close()

    await asyncio.gather(*(claimer(n) for n in range(8)))
    states = await pool.fetch("SELECT state, count(*) AS n FROM outbox_jobs GROUP BY state")
    assert {(r["state"], r["n"]) for r in states} == {("succeeded", total)}
    assert max(seen) == limit, f"most running after a claim: {max(seen)}"


@pytest.mark.parametrize(
    ("slots", "prefetch"),
    [
        pytest.param("20", None, id="three workers of twenty slots"),
        # Two slots each: the limit of five is only reached by all three together. Serving
        # the limited queue alone, each claims on the statement that writes its successes.
        pytest.param("2", "0", id="three workers of two slots"),
    ],
)
async def test_three_workers_run_at_most_the_limit_between_them(
    pool: asyncpg.Pool,
    spawn_worker: Callable[..., WorkerProcess],
    slots: str,
    prefetch: str | None,
) -> None:
    limit, total = 5, 80
    await pool.execute(
        "INSERT INTO outbox_queues (name, concurrency) VALUES ($1, $2)", LIMITED, limit
    )
    options = ["--concurrency", slots, *(["--prefetch", prefetch] if prefetch else [])]
    if slots == "2":
        options += ["--queues", LIMITED]
    workers = [spawn_worker(*options) for _ in range(3)]
    for worker in workers:  # all three claiming before the first job is due
        await worker.wait_for_log('"worker_ready"')
    await insert_sleepy(pool, total, 0.1)
    samples: list[int] = []

    async def all_done() -> bool:
        samples.append(await running(pool))
        done: int = await pool.fetchval(
            "SELECT count(*) FROM outbox_jobs WHERE state = 'succeeded'"
        )
        return done == total

    await wait_until(all_done, timeout=120, interval=0.005, what="every job done")
    for worker in workers:
        worker.signal(signal.SIGTERM)
    assert [worker.wait() for worker in workers] == [0, 0, 0]
    assert max(samples) <= limit, f"sampled running: {max(samples)}"
    assert max(samples) == limit, "the limit was never reached: nothing was tested"
    spans = await handler_spans(pool)
    assert len(spans) == total
    assert most_at_once(spans) <= limit
    if slots == "2":
        assert most_at_once(spans) == limit
        pids = await pool.fetchval("SELECT count(DISTINCT pid) FROM test_executions")
        assert pids == 3


async def test_a_killed_workers_jobs_hold_the_limit_until_their_leases_lapse(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    limit = 3
    ids = await insert_sleepy(pool, 9, 1.0)
    await pool.execute(
        "INSERT INTO outbox_queues (name, concurrency) VALUES ($1, $2)", LIMITED, limit
    )
    doomed = spawn_worker("--concurrency", "10", "--lease-seconds", "3")

    async def all_started() -> bool:
        started: int = await pool.fetchval(
            "SELECT count(*) FROM test_executions WHERE event = 'start'"
        )
        return started == limit

    await wait_until(all_started, what="the doomed worker's jobs started")
    doomed.kill()
    lapse = await pool.fetchval("SELECT min(locked_until) FROM outbox_jobs WHERE state = 'running'")
    heir = spawn_worker("--concurrency", "10", "--lease-seconds", "3")

    async def all_done() -> bool:
        # The dead worker's rows read running until the rescuer takes them back; past their
        # leases they no longer count.
        leased: int = await pool.fetchval(
            "SELECT count(*) FROM outbox_jobs WHERE state = 'running' AND locked_until > now()"
        )
        assert leased <= limit
        done: int = await pool.fetchval(
            "SELECT count(*) FROM outbox_jobs WHERE state = 'succeeded'"
        )
        return done == len(ids)

    await wait_until(all_done, timeout=60, interval=0.02, what="the queue drained by the heir")
    heir.signal(signal.SIGTERM)
    assert heir.wait() == 0
    first_start = await pool.fetchval(
        "SELECT min(at) FROM test_executions WHERE event = 'start' AND pid = $1", heir.pid
    )
    assert first_start >= lapse, "the heir started a job while the dead worker's leases held"
    spans = await handler_spans(pool)
    assert most_at_once(spans) <= limit


@pytest.mark.parametrize("prefetch", ["0", "8"])
async def test_a_pause_lets_running_jobs_finish_and_starts_nothing_until_resumed(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess], prefetch: str
) -> None:
    ids = await insert_sleepy(pool, 30, 0.3)
    worker = spawn_worker(
        "--concurrency", "2", "--prefetch", prefetch, "--poll-interval-seconds", "0.2"
    )

    async def started() -> int:
        n: int = await pool.fetchval("SELECT count(*) FROM test_executions WHERE event = 'start'")
        return n

    await wait_until(started, what="a first job started")
    await pool.execute("INSERT INTO outbox_queues (name, paused_at) VALUES ($1, now())", LIMITED)
    # Within a poll interval nothing more starts, and what ran finishes.
    await asyncio.sleep(0.2 + 0.3 + 0.3)
    frozen = await started()
    await asyncio.sleep(1.0)
    assert await started() == frozen
    assert await running(pool) == 0, "jobs claimed ahead of a paused queue are handed back"
    assert frozen < len(ids)
    left = await pool.fetch("SELECT attempts FROM outbox_jobs WHERE state = 'queued'")
    assert {row["attempts"] for row in left} == {0}, "a hand-back takes the attempt back"

    await pool.execute("UPDATE outbox_queues SET paused_at = NULL")

    async def all_done() -> bool:
        done: int = await pool.fetchval(
            "SELECT count(*) FROM outbox_jobs WHERE state = 'succeeded'"
        )
        return done == len(ids)

    await wait_until(all_done, timeout=60, what="every job done after the resume")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0


@pytest.mark.slow
async def test_three_workers_start_fifty_jobs_a_second_for_thirty_seconds(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """1,500 starts in 30 s, within 5 %, and no one-second window with more than 50 starts
    and a claim of one worker's slots besides."""
    rate, seconds, slots = 50, 30, 20
    await pool.execute(
        "INSERT INTO outbox_queues (name, rate_limit, rate_period) VALUES ($1, $2, 1)",
        LIMITED,
        rate,
    )
    workers = [spawn_worker("--concurrency", str(slots), "--queues", LIMITED) for _ in range(3)]
    for worker in workers:
        await worker.wait_for_log('"worker_ready"')
    await insert_sleepy(pool, rate * seconds * 2, 0.0)
    await asyncio.sleep(seconds + 3)
    for worker in workers:
        worker.signal(signal.SIGTERM)
    assert [worker.wait() for worker in workers] == [0, 0, 0]
    starts = sorted(
        row["started_at"].timestamp()
        for row in await pool.fetch("SELECT started_at FROM outbox_jobs WHERE attempts > 0")
    )
    first = starts[0]
    in_window = [t for t in starts if t < first + seconds]
    assert abs(len(in_window) - rate * seconds) <= rate * seconds * 0.05, len(in_window)
    busiest = max(bisect.bisect_left(starts, t + 1.0) - i for i, t in enumerate(starts))
    assert busiest <= rate + slots, f"{busiest} starts within one second"
    pids = await pool.fetchval("SELECT count(DISTINCT pid) FROM test_executions")
    assert pids == 3
