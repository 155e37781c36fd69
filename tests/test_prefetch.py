"""Jobs claimed ahead of a free slot: a slot whose job ends starts the next at once, yet a job
claimed ahead still counts against the worker, is handed back (its attempt with it) when the
worker stops, is cancelled without running when an operator asks, and is never a last
attempt, so that a worker killed with jobs waiting leaves none buried that did not run."""

from __future__ import annotations

import signal
from collections.abc import Callable

import asyncpg
import structlog

from outbox_worker import sql
from outbox_worker._worker.maintenance import Rescuer
from outbox_worker._worker.slots import Slots
from tests.conftest import WorkerProcess, wait_until
from tests.faults.invariants import log_events
from tests.support import count_started, insert_sleepy


async def _held_by(pool: asyncpg.Pool, worker: WorkerProcess) -> list[int]:
    """The rows running under the worker's name (started or waiting)."""
    rows = await pool.fetch(
        "SELECT id FROM outbox_jobs WHERE state = 'running' AND locked_by LIKE $1 ORDER BY id",
        f"%:{worker.pid}:%",
    )
    return [r["id"] for r in rows]


async def _warm_up(pool: asyncpg.Pool, worker: WorkerProcess) -> None:
    """No-op jobs run, so that the worker knows its jobs are short: until it knows how long
    they take it claims for its free slots only."""
    await worker.wait_for_log("worker_ready")
    await pool.execute("INSERT INTO outbox_jobs (task) SELECT 'noop' FROM generate_series(1, 20)")

    async def done() -> bool:
        return bool(await pool.fetchval("SELECT bool_and(state = 'succeeded') FROM outbox_jobs"))

    await wait_until(done, what="the warm-up jobs")
    await pool.execute("DELETE FROM outbox_jobs")


def test_jobs_worth_claiming_ahead_follow_the_slots_finishing_during_a_round_trip() -> None:
    slots = Slots(4, ahead=100, log=structlog.get_logger("test"))
    assert slots.worth_ahead() == 0, "nothing is known yet: claim for free slots only"
    slots.job_seconds, slots.trip_seconds = 0.001, 0.004
    assert slots.worth_ahead() == 64  # 4 slots finish 16 jobs a round trip; 2 trips, doubled
    slots.job_seconds = 0.0001
    assert slots.worth_ahead() == 100  # never past the setting
    slots.job_seconds = 2.0
    assert slots.worth_ahead() == 1  # long jobs: one each round trip at most
    assert Slots(4, ahead=0, log=structlog.get_logger("test")).worth_ahead() == 0


async def test_a_claim_ahead_takes_a_last_attempt_only_for_a_slot_free_now(
    pool: asyncpg.Pool,
) -> None:
    """Of :limit rows, the first :limit - :ahead (in claim order) may be last attempts; a
    last attempt past them is left queued, untouched, for a later claim."""
    last = await insert_sleepy(pool, 4, 0.1, max_attempts=1)
    spare = await insert_sleepy(pool, 2, 0.1, max_attempts=3)
    rows = await pool.fetch(
        *sql.bind(
            sql.JOB_CLAIM,
            queues=["slow"],
            limit=5,
            ahead=3,
            worker_id="w",
            lease_seconds=30.0,
        )
    )
    assert sorted(r["id"] for r in rows) == [*last[:2], spare[0]]
    left = await pool.fetch(
        "SELECT id, state, attempts, locked_by FROM outbox_jobs WHERE id = ANY($1) ORDER BY id",
        [*last[2:], spare[1]],
    )
    assert [tuple(r) for r in left] == [
        (job_id, "queued", 0, None) for job_id in [*last[2:], spare[1]]
    ]


async def test_jobs_waiting_ahead_are_handed_back_on_sigterm_with_their_attempt(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    w = spawn_worker("--concurrency", "1", "--prefetch", "3", "--drain-timeout-seconds", "10")
    await _warm_up(pool, w)
    ids = await insert_sleepy(pool, 4, 1.5)

    async def three_waiting() -> bool:
        return await _held_by(pool, w) == ids and await count_started(pool, ids) == 1

    await wait_until(three_waiting, what="one job running and three claimed ahead")
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0, w.output()

    rows = await pool.fetch("SELECT id, state, attempts, locked_by FROM outbox_jobs ORDER BY id")
    assert [tuple(r) for r in rows] == [
        (ids[0], "succeeded", 1, None),
        *[(job_id, "queued", 0, None) for job_id in ids[1:]],
    ]
    assert await count_started(pool, ids) == 1
    [handed_back] = log_events(w, "claimed_ahead_handed_back")
    assert handed_back["jobs"] == ids[1:]


async def test_a_job_waiting_ahead_whose_cancel_is_asked_ends_cancelled_without_running(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    w = spawn_worker("--concurrency", "1", "--prefetch", "3", "--lease-seconds", "3")
    await _warm_up(pool, w)
    ids = await insert_sleepy(pool, 2, 3.0)

    async def one_waiting() -> bool:
        return await _held_by(pool, w) == ids and await count_started(pool, ids) == 1

    await wait_until(one_waiting, what="one job running and one claimed ahead")
    await pool.execute("UPDATE outbox_jobs SET cancel_requested_at = now() WHERE id = $1", ids[1])

    async def cancelled() -> bool:
        state = await pool.fetchval("SELECT state FROM outbox_jobs WHERE id = $1", ids[1])
        return bool(state == "cancelled")

    await wait_until(cancelled, timeout=10, what="the waiting job to end cancelled")
    assert await count_started(pool, ids) == 1
    assert await pool.fetchval("SELECT state FROM outbox_jobs WHERE id = $1", ids[0]) == "running"


async def test_a_worker_killed_with_jobs_waiting_never_leaves_one_dead_that_did_not_run(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """Jobs on their last attempt are never claimed ahead; the others claimed ahead come back
    with the attempt counted (the claim is the only durable mark of a start), never dead."""
    w = spawn_worker("--concurrency", "2", "--prefetch", "8", "--lease-seconds", "1")
    await _warm_up(pool, w)
    last, spare = [], []
    for _ in range(6):  # in claim order: a last attempt, a spare one, a last attempt, ...
        last += await insert_sleepy(pool, 1, 5.0, max_attempts=1)
        spare += await insert_sleepy(pool, 1, 5.0, max_attempts=2)

    async def some_waiting() -> bool:
        return len(await _held_by(pool, w)) > await count_started(pool, last + spare) == 2

    await wait_until(some_waiting, what="jobs claimed ahead of the two slots")
    held = await _held_by(pool, w)
    w.signal(signal.SIGKILL)
    assert w.wait(10) == -signal.SIGKILL

    await pool.execute("SELECT pg_sleep(1.2)")  # the leases lapse
    rescuer = Rescuer(pool=pool, interval=60.0, log=structlog.get_logger("test"))
    assert await rescuer.rescue_once() == len(held)
    started = {
        r["job_id"]
        for r in await pool.fetch("SELECT job_id FROM test_executions WHERE event = 'start'")
    }
    rows = await pool.fetch(
        "SELECT id, state, attempts, max_attempts FROM outbox_jobs WHERE id = ANY($1)", held
    )
    dead = {r["id"] for r in rows if r["state"] == "dead"}
    assert dead <= started, f"buried without running: {dead - started}"
    waited = {r["id"] for r in rows} - started
    assert len(waited) > 1, "too few jobs were waiting when the worker died"
    assert all(r["max_attempts"] == 2 for r in rows if r["id"] in waited)
    assert {(r["state"], r["attempts"]) for r in rows if r["id"] in waited} == {("queued", 1)}
