"""Retries: backoff bounds (property-based), a flaky job retried with growing gaps until it
succeeds, a failing job that ends dead, poison jobs and unknown tasks that go dead without
running and block nothing, and a handler that overruns its timeout."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import signal
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

import tests.workload  # noqa: F401 -- registers the tasks enqueue checks names against
from outbox_worker import enqueue
from outbox_worker._worker.backoff import retry_delay
from tests.conftest import WorkerProcess, wait_until

# ---------------------------------------------------------------------------------------------
# retry_delay: uniform in [b/2, b], b = min(cap, base * 2 ** (attempt - 1))
# ---------------------------------------------------------------------------------------------

JUST_BELOW_ONE = math.nextafter(1.0, 0.0)

attempts = st.integers(min_value=1, max_value=10_000)
bases = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)
# cap / base: at most 2**60, so that the cap (not the exponent clamp in backoff.py, which
# stops doubling after 64 doublings to avoid overflow) is what bounds every delay.
cap_factors = st.floats(min_value=1.0, max_value=2.0**60, allow_nan=False, allow_infinity=False)
rands = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


def bound(attempt: int, base: float, cap: float) -> float:
    """The documented upper bound, with exact integer powers (no clamp of our own)."""
    if attempt > 1000:  # base * 2**999 is beyond every cap drawn here (and near overflow)
        return cap
    return min(cap, base * 2.0 ** (attempt - 1))


@given(attempt=attempts, base=bases, cap_factor=cap_factors, r=rands)
def test_delay_lies_in_the_upper_half_of_the_capped_exponential(
    attempt: int, base: float, cap_factor: float, r: float
) -> None:
    cap = base * cap_factor
    b = bound(attempt, base, cap)
    delay = retry_delay(attempt, base=base, cap=cap, rand=lambda: r)
    assert b / 2 <= delay <= b
    assert 0 < delay <= cap


@given(attempt=attempts, base=bases, cap_factor=cap_factors)
def test_default_randomness_stays_in_bounds(attempt: int, base: float, cap_factor: float) -> None:
    cap = base * cap_factor
    b = bound(attempt, base, cap)
    assert b / 2 <= retry_delay(attempt, base=base, cap=cap) <= b


@given(
    attempt=st.integers(min_value=1, max_value=200),
    base=bases,
    cap_factor=cap_factors,
    r1=rands,
    r2=rands,
)
def test_gaps_grow_until_the_cap(
    attempt: int, base: float, cap_factor: float, r1: float, r2: float
) -> None:
    cap = base * cap_factor
    this_time = retry_delay(attempt, base=base, cap=cap, rand=lambda: r1)
    next_time = retry_delay(attempt + 1, base=base, cap=cap, rand=lambda: r2)
    if base * 2.0**attempt <= cap:
        # Below the cap the next lower bound is this upper bound: every draw is at least
        # as long as any draw of the attempt before.
        lowest_next = retry_delay(attempt + 1, base=base, cap=cap, rand=lambda: 0.0)
        highest_this = retry_delay(attempt, base=base, cap=cap, rand=lambda: JUST_BELOW_ONE)
        assert lowest_next >= highest_this
        assert next_time >= this_time
    else:
        # At the cap the range stops moving up, but never moves down.
        assert next_time >= cap / 2
        assert retry_delay(attempt + 1, base=base, cap=cap, rand=lambda: 0.0) >= retry_delay(
            attempt, base=base, cap=cap, rand=lambda: 0.0
        )


@given(attempt=st.integers(max_value=0), base=bases, cap_factor=cap_factors)
def test_attempt_below_one_is_refused(attempt: int, base: float, cap_factor: float) -> None:
    with pytest.raises(ValueError, match="1-based"):
        retry_delay(attempt, base=base, cap=base * cap_factor, rand=lambda: 0.5)


def test_huge_attempt_numbers_give_the_cap_not_an_overflow() -> None:
    assert retry_delay(10**9, base=1.0, cap=3600.0, rand=lambda: 0.0) == 1800.0
    assert retry_delay(10**9, base=1.0, cap=3600.0, rand=lambda: JUST_BELOW_ONE) <= 3600.0


# ---------------------------------------------------------------------------------------------
# With real worker processes
# ---------------------------------------------------------------------------------------------

# Retries are not announced by NOTIFY (an UPDATE, not an INSERT): a short poll makes the
# worker pick a retry up soon after it is due, so the measured gaps are mostly the backoff.
FAST_POLL = ("--poll-interval-seconds", "0.01")


async def job_row(pool: asyncpg.Pool, job_id: int) -> asyncpg.Record:
    row: asyncpg.Record | None = await pool.fetchrow(
        "SELECT *, result::text AS result_text FROM outbox_jobs WHERE id = $1", job_id
    )
    assert row is not None
    return row


async def wait_for_state(pool: asyncpg.Pool, job_id: int, state: str, timeout: float = 60) -> None:
    async def reached() -> bool:
        found: str = await pool.fetchval("SELECT state FROM outbox_jobs WHERE id = $1", job_id)
        return found == state

    await wait_until(reached, timeout=timeout, what=f"job {job_id} to be {state}")


async def executions(pool: asyncpg.Pool, job_id: int) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT attempt, event, at FROM test_executions WHERE job_id = $1 ORDER BY seq", job_id
    )
    return rows


async def stop(worker: WorkerProcess) -> None:
    worker.signal(signal.SIGTERM)
    code = await asyncio.to_thread(worker.wait, 60)
    assert code == 0, worker.output()[-3000:]


def log_events(worker: WorkerProcess) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for line in worker.output().splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


async def test_flaky_job_is_retried_with_growing_gaps_then_succeeds(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    base = 0.5
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args) VALUES ('flaky', '{\"failures\": 3}') RETURNING id"
    )
    worker = spawn_worker(
        *FAST_POLL,
        env={"OUTBOX_RETRY_BASE_SECONDS": str(base), "OUTBOX_RETRY_CAP_SECONDS": "10"},
    )
    await wait_for_state(pool, job_id, "succeeded")
    await stop(worker)

    row = await job_row(pool, job_id)
    assert row["attempts"] == 4
    assert json.loads(row["result_text"]) == "ok"
    assert row["finished_at"] is not None
    assert row["locked_by"] is None
    assert row["locked_until"] is None
    # Success does not clear the error of the failure before it (JOB_COMPLETE_MANY leaves
    # last_error alone): an operator can still see why it needed four attempts.
    assert (row["last_error"] or "").startswith("RuntimeError: planned failure 3 of 3")

    runs = await executions(pool, job_id)
    assert [r["attempt"] for r in runs] == [1, 2, 3, 4]
    gaps = [(b["at"] - a["at"]).total_seconds() for a, b in itertools.pairwise(runs)]
    # Each failure put run_at at now() + delay, delay >= base * 2**(n-1) / 2, and the next
    # attempt cannot start before run_at (all on the database's clock).
    for n, gap in enumerate(gaps, start=1):
        assert gap >= base * 2 ** (n - 1) / 2, gaps
    # Growth: over two steps the ranges do not even touch; over one step they meet at an
    # edge, so allow for the poll and scheduling noise that adds to a gap.
    assert gaps[2] > gaps[0], gaps
    assert gaps[1] > gaps[0] - 0.25, gaps
    assert gaps[2] > gaps[1] - 0.25, gaps


async def test_always_failing_job_ends_dead_after_max_attempts(
    engine: AsyncEngine, pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    async with AsyncSession(engine) as session:
        job = await enqueue(session, "always_fails")
        await session.commit()
    assert job.max_attempts == 3

    worker = spawn_worker(*FAST_POLL)
    await wait_for_state(pool, job.id, "dead")
    await asyncio.sleep(0.5)  # nothing more may happen to a dead job
    await stop(worker)

    row = await job_row(pool, job.id)
    assert row["state"] == "dead"
    assert row["attempts"] == 3
    assert row["max_attempts"] == 3
    assert (row["last_error"] or "").startswith("ValueError: this task always fails")
    assert row["finished_at"] is not None
    assert row["locked_by"] is None
    assert [r["attempt"] for r in await executions(pool, job.id)] == [1, 2, 3]


async def test_unknown_task_and_poison_args_go_dead_without_running_and_block_nothing(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    unknown_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args, priority, run_at) "
        "VALUES ('no_such_task', '{\"x\": 1}', 10, now() - interval '2 minutes') RETURNING id"
    )
    poison_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args, priority, run_at) "
        "VALUES ('takes_id', '{}', 10, now() - interval '1 minute') RETURNING id"
    )
    echo_ids = {
        r["id"]
        for r in await pool.fetch(
            "INSERT INTO outbox_jobs (task, args) "
            "SELECT 'echo', jsonb_build_object('n', g) FROM generate_series(1, 20) g "
            "RETURNING id"
        )
    }

    # One slot: the bad jobs are claimed first, so the echo jobs run only if they get out
    # of the way.
    worker = spawn_worker("--burst", "--concurrency", "1")
    code = await asyncio.to_thread(worker.wait, 90)
    assert code == 0, worker.output()[-3000:]

    unknown = await job_row(pool, unknown_id)
    assert unknown["state"] == "dead"
    assert unknown["attempts"] == 1
    assert unknown["max_attempts"] == 5  # it had attempts left: it gave up, it did not run out
    assert "unknown task" in unknown["last_error"]
    assert "no_such_task" in unknown["last_error"]
    assert unknown["finished_at"] is not None

    poison = await job_row(pool, poison_id)
    assert poison["state"] == "dead"
    assert poison["attempts"] == 1
    assert poison["max_attempts"] == 5
    assert "user_id" in poison["last_error"]
    assert "missing" in poison["last_error"]
    assert poison["result"] is None
    assert poison["finished_at"] is not None

    ran = {r["job_id"] for r in await pool.fetch("SELECT job_id FROM test_executions")}
    assert ran == echo_ids
    states = await pool.fetch(
        "SELECT state, count(*) AS n FROM outbox_jobs WHERE id = ANY($1::bigint[]) GROUP BY 1",
        list(echo_ids),
    )
    assert {r["state"]: r["n"] for r in states} == {"succeeded": 20}

    events = log_events(worker)
    started = {e.get("job_id") for e in events if e.get("event") == "job_started"}
    assert echo_ids <= started, "the worker log does not show handlers starting"
    assert unknown_id not in started
    assert poison_id not in started
    dead_without_running = {
        e.get("job_id") for e in events if e.get("event") == "job_dead_without_running"
    }
    assert {unknown_id, poison_id} <= dead_without_running


async def test_job_over_its_timeout_goes_dead_with_a_timeout_error(
    engine: AsyncEngine, pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    async with AsyncSession(engine) as session:
        job = await enqueue(session, "hangs")
        await session.commit()
    assert job.max_attempts == 2

    worker = spawn_worker(*FAST_POLL)
    await wait_for_state(pool, job.id, "dead")
    await stop(worker)

    row = await job_row(pool, job.id)
    assert row["attempts"] == 2
    assert (row["last_error"] or "").startswith("TimeoutError")
    assert "timeout" in row["last_error"]
    assert "0.5" in row["last_error"]
    assert row["finished_at"] is not None
    runs = await executions(pool, job.id)
    # Both attempts started and were cut off (the handler sleeps an hour): none ran again.
    assert [r["attempt"] for r in runs] == [1, 2]
