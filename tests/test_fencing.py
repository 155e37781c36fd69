"""A worker that lost its lease cannot write the job any more, and a finished job never moves
backwards."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
import structlog

from outbox_worker import JobContext, LeaseLost, OutboxError, Worker, WorkerOptions, sql
from outbox_worker._worker.maintenance import Rescuer
from tests.conftest import WorkerProcess, wait_until
from tests.workload import registry as workload_registry

QUEUES = ["default"]
log = structlog.get_logger("test")


async def _row(pool: asyncpg.Pool, job_id: int) -> dict[str, Any]:
    row = await pool.fetchrow(
        "SELECT id, state, attempts, max_attempts, run_at, locked_by, locked_until, result::text "
        "AS result, last_error, started_at, finished_at FROM outbox_jobs WHERE id = $1",
        job_id,
    )
    assert row is not None
    return dict(row)


async def _claim(pool: asyncpg.Pool, worker_id: str, lease: float) -> asyncpg.Record:
    rows = await pool.fetch(sql.JOB_CLAIM, QUEUES, 1, 0, worker_id, lease)
    assert len(rows) == 1, rows
    return rows[0]


async def _rescue(pool: asyncpg.Pool) -> int:
    return await Rescuer(pool=pool, interval=60.0, log=log).rescue_once()


async def _complete(pool: asyncpg.Pool, job_id: int, attempt: int, worker: str) -> int:
    rows = await pool.fetch(
        sql.JOB_COMPLETE_MANY, [job_id], [attempt], [json.dumps({"by": worker})], worker
    )
    return len(rows)


async def _fail(pool: asyncpg.Pool, job_id: int, attempt: int, worker: str) -> int:
    rows = await pool.fetch(
        sql.JOB_FAIL_MANY, [job_id], [attempt], [f"failed by {worker}"], [0.0], [False], worker
    )
    return len(rows)


async def _give_up(pool: asyncpg.Pool, job_id: int, attempt: int, worker: str) -> int:
    rows = await pool.fetch(
        sql.JOB_FAIL_MANY, [job_id], [attempt], [f"buried by {worker}"], [0.0], [True], worker
    )
    return len(rows)


async def _extend(pool: asyncpg.Pool, job_id: int, attempt: int, worker: str) -> int:
    rows = await pool.fetch(
        *sql.bind(
            sql.JOB_EXTEND_LEASES,
            ids=[job_id],
            attempts=[attempt],
            progress=['{"late": true}'],
            worker_id=worker,
            lease_seconds=3600.0,
        )
    )
    return len(rows)


async def _release(pool: asyncpg.Pool, job_id: int, attempt: int, worker: str) -> int:
    rows = await pool.fetch(sql.JOB_RELEASE_MANY, [job_id], [attempt], worker)
    return len(rows)


WRITES = [_complete, _fail, _give_up, _extend, _release]


async def _taken_over(pool: asyncpg.Pool, first: str, second: str) -> int:
    """A job claimed by ``first`` with a tiny lease, rescued, and claimed again by ``second``."""
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args) VALUES ('echo', '{}') RETURNING id"
    )
    claimed = await _claim(pool, first, 0.05)
    assert (claimed["id"], claimed["attempts"]) == (job_id, 1)
    await asyncio.sleep(0.2)
    assert await _rescue(pool) == 1
    rescued = await _row(pool, job_id)
    assert (rescued["state"], rescued["attempts"], rescued["locked_by"]) == ("queued", 1, None)
    again = await _claim(pool, second, 30.0)
    assert (again["id"], again["attempts"]) == (job_id, 2)
    return job_id


@pytest.mark.parametrize("write", WRITES, ids=lambda w: w.__name__.strip("_"))
async def test_stale_worker_cannot_write_a_taken_over_job(
    pool: asyncpg.Pool, write: Callable[[asyncpg.Pool, int, int, str], Any]
) -> None:
    job_id = await _taken_over(pool, "w1", "w2")
    before = await _row(pool, job_id)
    assert (before["state"], before["locked_by"], before["attempts"]) == ("running", "w2", 2)

    assert await write(pool, job_id, 1, "w1") == 0  # w1 with its own, stale attempt
    assert await write(pool, job_id, 2, "w1") == 0  # w1 guessing the current attempt
    assert await write(pool, job_id, 1, "w2") == 0  # the right worker, a stale attempt
    assert await _row(pool, job_id) == before

    # The fence is not simply shut: the owner of the current attempt gets through.
    assert await write(pool, job_id, 2, "w2") == 1


async def test_same_worker_id_is_fenced_by_attempt(pool: asyncpg.Pool) -> None:
    """A worker that stalled, lost its job and then claimed it again must not let the
    finished first attempt write over the second one."""
    job_id = await _taken_over(pool, "w1", "w1")
    before = await _row(pool, job_id)
    for write in WRITES:
        assert await write(pool, job_id, 1, "w1") == 0, write.__name__
    assert await _row(pool, job_id) == before


async def test_finished_job_never_moves_backwards(pool: asyncpg.Pool) -> None:
    job_id = await _taken_over(pool, "w1", "w2")
    assert await _complete(pool, job_id, 2, "w2") == 1
    done = await _row(pool, job_id)
    assert done["state"] == "succeeded"
    assert json.loads(done["result"]) == {"by": "w2"}
    assert done["locked_by"] is None
    assert done["finished_at"] is not None

    for worker in ("w1", "w2"):
        for attempt in (1, 2):
            for write in WRITES:
                assert await write(pool, job_id, attempt, worker) == 0, (write, worker, attempt)
    assert await _rescue(pool) == 0
    assert await _row(pool, job_id) == done

    # A second claim cannot pick it up either.
    assert await pool.fetch(sql.JOB_CLAIM, QUEUES, 10, 0, "w3", 30.0) == []


async def test_dead_job_never_moves_backwards(pool: asyncpg.Pool) -> None:
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args, max_attempts) VALUES ('echo', '{}', 1) RETURNING id"
    )
    await _claim(pool, "w1", 30.0)
    assert await _fail(pool, job_id, 1, "w1") == 1
    dead = await _row(pool, job_id)
    assert dead["state"] == "dead"
    for write in WRITES:
        assert await write(pool, job_id, 1, "w1") == 0, write.__name__
    assert await _row(pool, job_id) == dead


def _context(pool: asyncpg.Pool, job_id: int, attempt: int, worker_id: str) -> JobContext:
    return JobContext(
        job_id=job_id,
        task="write_once",
        queue="default",
        attempt=attempt,
        max_attempts=5,
        correlation_id=None,
        worker_id=worker_id,
        pool=pool,
        log=log,
    )


async def _effects(pool: asyncpg.Pool) -> list[tuple[int, str]]:
    rows = await pool.fetch("SELECT job_id, note FROM test_effects ORDER BY job_id")
    return [(r["job_id"], r["note"]) for r in rows]


async def test_transaction_with_lost_lease_rolls_back_and_raises(pool: asyncpg.Pool) -> None:
    job_id = await _taken_over(pool, "w1", "w2")
    before = await _row(pool, job_id)

    stale = _context(pool, job_id, 1, "w1")
    stale.result = {"note": "stale"}
    with pytest.raises(LeaseLost):
        async with stale.transaction() as conn:
            await conn.execute(
                "INSERT INTO test_effects (job_id, note) VALUES ($1, 'stale')", job_id
            )
    assert not stale.completed_in_transaction
    assert await _effects(pool) == []
    assert await _row(pool, job_id) == before

    # The holder's transaction commits its writes and the completion together.
    holder = _context(pool, job_id, 2, "w2")
    async with holder.transaction() as conn:
        await conn.execute("INSERT INTO test_effects (job_id, note) VALUES ($1, 'held')", job_id)
        holder.result = {"note": "held"}
    assert holder.completed_in_transaction
    assert await _effects(pool) == [(job_id, "held")]
    done = await _row(pool, job_id)
    assert (done["state"], done["attempts"]) == ("succeeded", 2)
    assert json.loads(done["result"]) == {"note": "held"}

    with pytest.raises(OutboxError):
        async with holder.transaction():
            pass


async def test_transaction_whose_body_fails_writes_nothing(pool: asyncpg.Pool) -> None:
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args) VALUES ('write_once', '{}') RETURNING id"
    )
    await _claim(pool, "w1", 30.0)
    before = await _row(pool, job_id)
    ctx = _context(pool, job_id, 1, "w1")

    async def handler_body() -> None:
        async with ctx.transaction() as conn:
            await conn.execute("INSERT INTO test_effects (job_id, note) VALUES ($1, 'x')", job_id)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await handler_body()
    assert not ctx.completed_in_transaction
    assert await _effects(pool) == []
    assert await _row(pool, job_id) == before


# ---------------------------------------------------------------------------------------------
# Real processes: a worker frozen by SIGSTOP outlives its lease, then wakes up.
# ---------------------------------------------------------------------------------------------


async def _executions(pool: asyncpg.Pool, job_id: int) -> list[tuple[int, int, str]]:
    rows = await pool.fetch(
        "SELECT attempt, pid, event FROM test_executions WHERE job_id = $1 ORDER BY seq", job_id
    )
    return [(r["attempt"], r["pid"], r["event"]) for r in rows]


async def test_frozen_worker_late_completion_changes_nothing(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    a = spawn_worker("--lease-seconds", "1")
    await a.wait_for_log("worker_ready")
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (queue, task, args) "
        "VALUES ('slow', 'sleepy', '{\"seconds\": 2}') RETURNING id"
    )

    async def started() -> bool:
        return (1, a.pid, "start") in await _executions(pool, job_id)

    await wait_until(started, timeout=20, what="worker A to start the job")
    a.signal(signal.SIGSTOP)
    try:
        b = spawn_worker("--lease-seconds", "1")

        async def done_by_b() -> bool:
            return (2, b.pid, "end") in await _executions(pool, job_id)

        await wait_until(done_by_b, timeout=30, what="worker B to run the rescued job")

        async def succeeded() -> bool:
            return bool((await _row(pool, job_id))["state"] == "succeeded")

        await wait_until(succeeded, timeout=10, what="B's completion")
        after_b = await _row(pool, job_id)
        assert after_b["attempts"] == 2
        assert after_b["result"] == '"slept"'
    finally:
        a.signal(signal.SIGCONT)

    # A wakes with its sleep and its lease long over. Either its handler finishes attempt 1
    # and the fence refuses the completion, or its lease guard stops the handler first.
    seen = await a.wait_for_log(
        "outcome_dropped_lease_lost", "job_stopped_lease_lapsing", timeout=20
    )
    if seen == "outcome_dropped_lease_lost":
        assert (1, a.pid, "end") in await _executions(pool, job_id)
    assert await _row(pool, job_id) == after_b
    assert a.proc.poll() is None  # losing a lease is not a crash


async def test_frozen_worker_effectively_once_write_is_rolled_back(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    a = spawn_worker("--lease-seconds", "1")
    await a.wait_for_log("worker_ready")
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args) "
        'VALUES (\'write_once\', \'{"note": "once", "pause": 3}\') RETURNING id'
    )
    database = await pool.fetchval("SELECT current_database()")

    async def in_transaction() -> bool:
        # A's handler has written its effect and is pausing before the commit.
        return bool(
            await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 "
                "AND state = 'idle in transaction' AND query ILIKE 'INSERT INTO test_effects%'",
                database,
            )
        )

    await wait_until(in_transaction, timeout=20, what="worker A inside ctx.transaction()")
    assert [(e[0], e[1]) for e in await _executions(pool, job_id)] == [(1, a.pid)]
    a.signal(signal.SIGSTOP)
    try:
        b = spawn_worker("--lease-seconds", "1")

        async def taken_by_b() -> bool:
            return (2, b.pid, "run") in await _executions(pool, job_id)

        # B rescues the job and starts attempt 2; its INSERT then waits for A's open
        # transaction, which holds the same test_effects key.
        await wait_until(taken_by_b, timeout=30, what="worker B to start attempt 2")
    finally:
        a.signal(signal.SIGCONT)

    async def finished() -> bool:
        return bool((await _row(pool, job_id))["state"] in ("succeeded", "dead"))

    await wait_until(finished, timeout=30, what="the job to finish")
    # A's transaction is rolled back either way: by the fence at its commit, or by its lease
    # guard stopping the handler first.
    await a.wait_for_log("job_lease_lost", "job_stopped_lease_lapsing", timeout=20)
    done = await _row(pool, job_id)
    assert done["state"] == "succeeded", done
    assert done["attempts"] == 2
    assert json.loads(done["result"]) == {"note": "once"}
    assert await _effects(pool) == [(job_id, "once")]
    executions = await _executions(pool, job_id)
    assert sorted((e[0], e[1]) for e in executions) == [(1, a.pid), (2, b.pid)], executions
    assert "job_lease_lost" not in b.output()


async def test_workers_given_the_same_name_never_share_an_id(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """The fence and the hand-back of lost claims trust the worker id: two workers sharing one
    would write over each other's outcomes and hand back each other's running jobs. So an id
    is unique by construction, even for workers given the same name."""
    options = WorkerOptions(dsn=database_url, burst=True, poll_interval=0.05, listen=False)
    twins = [Worker(workload_registry, options, name="twin") for _ in range(2)]
    assert twins[0].worker_id != twins[1].worker_id
    assert all(w.worker_id.startswith("twin:") for w in twins)
    await pool.execute(
        "INSERT INTO outbox_jobs (task, args) "
        "SELECT 'whoami', '{\"seconds\": 0.3}' FROM generate_series(1, 40)"
    )
    await asyncio.gather(*(w.run() for w in twins))
    rows = await pool.fetch("SELECT state, attempts, result #>> '{}' AS ran_by FROM outbox_jobs")
    assert {(r["state"], r["attempts"]) for r in rows} == {("succeeded", 1)}
    assert {r["ran_by"] for r in rows} == {w.worker_id for w in twins}
