"""A job whose worker died is put back (or buried) without any task the user writes."""

from __future__ import annotations

import signal
from collections.abc import Callable

import asyncpg
import structlog

from outbox_worker._worker.maintenance import Rescuer
from tests.conftest import WorkerProcess, wait_until


async def _executions(pool: asyncpg.Pool, job_id: int) -> list[tuple[int, int, str, str]]:
    rows = await pool.fetch(
        "SELECT attempt, pid, worker_id, event FROM test_executions WHERE job_id = $1 ORDER BY seq",
        job_id,
    )
    return [(r["attempt"], r["pid"], r["worker_id"], r["event"]) for r in rows]


def _rescuer(pool: asyncpg.Pool) -> Rescuer:
    return Rescuer(pool=pool, interval=60.0, log=structlog.get_logger("test"))


async def test_job_of_a_killed_worker_is_finished_by_another(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    a = spawn_worker("--lease-seconds", "2")
    await a.wait_for_log("worker_ready")
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (queue, task, args) "
        "VALUES ('slow', 'sleepy', '{\"seconds\": 1}') RETURNING id"
    )

    async def started_by_a() -> bool:
        return any(e[3] == "start" for e in await _executions(pool, job_id))

    await wait_until(started_by_a, timeout=20, what="worker A to start the job")
    a.signal(signal.SIGKILL)
    assert a.wait(10) == -signal.SIGKILL

    row = await pool.fetchrow(
        "SELECT state, attempts, locked_by FROM outbox_jobs WHERE id = $1", job_id
    )
    assert row is not None
    assert row["state"] == "running"  # A died holding it: only the lease can bring it back
    assert row["attempts"] == 1

    b = spawn_worker("--lease-seconds", "2")

    async def finished() -> bool:
        state = await pool.fetchval("SELECT state FROM outbox_jobs WHERE id = $1", job_id)
        return state in ("succeeded", "dead")

    await wait_until(finished, timeout=30, what="the job to finish on worker B")
    done = await pool.fetchrow(
        "SELECT state, attempts, result::text AS result, locked_by, locked_until, last_error "
        "FROM outbox_jobs WHERE id = $1",
        job_id,
    )
    assert done is not None
    assert done["state"] == "succeeded", dict(done)
    assert done["attempts"] == 2
    assert done["result"] == '"slept"'
    assert done["locked_by"] is None
    assert done["locked_until"] is None

    executions = await _executions(pool, job_id)
    first = [(pid, event) for attempt, pid, _, event in executions if attempt == 1]
    second = [(pid, event) for attempt, pid, _, event in executions if attempt == 2]
    assert first == [(a.pid, "start")], executions  # A never got to the end of attempt 1
    assert second == [(b.pid, "start"), (b.pid, "end")], executions
    assert {attempt for attempt, *_ in executions} == {1, 2}, executions
    assert f":{a.pid}:" in executions[0][2]
    assert "job_rescued" in b.output()


async def _insert_running(
    pool: asyncpg.Pool, task: str, attempts: int, max_attempts: int, lease_offset: float
) -> int:
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args, state, attempts, max_attempts, locked_by, "
        "locked_until, started_at) VALUES ($1, '{}', 'running', $2, $3, 'ghost:1:abc', "
        "now() + make_interval(secs => $4::float8), now()) RETURNING id",
        task,
        attempts,
        max_attempts,
        lease_offset,
    )
    return job_id


async def test_rescuer_buries_last_attempt_and_requeues_the_rest(pool: asyncpg.Pool) -> None:
    last = await _insert_running(pool, "echo", 3, 3, -5.0)
    retry = await _insert_running(pool, "echo", 1, 3, -5.0)
    alive = await _insert_running(pool, "echo", 1, 3, 30.0)

    assert await _rescuer(pool).rescue_once() == 2

    rows = {
        r["id"]: r
        for r in await pool.fetch(
            "SELECT id, state, attempts, last_error, locked_by, locked_until, finished_at, "
            "run_at <= now() AS due FROM outbox_jobs"
        )
    }
    dead = rows[last]
    assert dead["state"] == "dead"
    assert dead["attempts"] == 3
    assert "lease" in dead["last_error"].lower()
    assert dead["finished_at"] is not None
    assert dead["locked_by"] is None
    assert dead["locked_until"] is None

    requeued = rows[retry]
    assert requeued["state"] == "queued"
    assert requeued["attempts"] == 1  # the lost attempt counts: it did start
    assert requeued["due"]
    assert "lease" in requeued["last_error"].lower()
    assert requeued["finished_at"] is None
    assert requeued["locked_by"] is None
    assert requeued["locked_until"] is None

    untouched = rows[alive]
    assert untouched["state"] == "running"
    assert untouched["locked_by"] == "ghost:1:abc"
    assert untouched["last_error"] is None

    # Nothing left to do: a second pass changes nothing.
    assert await _rescuer(pool).rescue_once() == 0


async def test_worker_rescues_on_start_last_attempt_dead_never_run(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    last = await _insert_running(pool, "echo", 5, 5, -5.0)
    retry = await _insert_running(pool, "echo", 2, 5, -5.0)

    w = spawn_worker("--burst", "--lease-seconds", "2")
    assert w.wait(30) == 0, w.output()

    dead = await pool.fetchrow("SELECT state, last_error FROM outbox_jobs WHERE id = $1", last)
    assert dead is not None
    assert dead["state"] == "dead"
    assert "lease" in dead["last_error"].lower()
    assert await _executions(pool, last) == []  # out of attempts: never run again

    again = await pool.fetchrow("SELECT state, attempts FROM outbox_jobs WHERE id = $1", retry)
    assert again is not None
    assert (again["state"], again["attempts"]) == ("succeeded", 3)
    assert [(e[0], e[1]) for e in await _executions(pool, retry)] == [(3, w.pid)]
