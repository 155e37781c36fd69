"""The checker itself: each invariant it promises, broken on purpose, is reported. Without
this, a fault test could pass because its checker never looks."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from tests.faults.invariants import check_invariants


@dataclass
class FakeWorker:
    """A worker known only by its pid and its log lines."""

    pid: int
    lines: list[dict[str, object]]

    def output(self) -> str:
        return "\n".join(json.dumps(line) for line in self.lines)


async def _job(
    pool: asyncpg.Pool,
    state: str = "succeeded",
    attempts: int = 1,
    *,
    max_attempts: int = 5,
    last_error: str | None = None,
    task: str = "sleepy",
) -> int:
    running = state == "running"
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, state, attempts, max_attempts, last_error, locked_by, "
        "locked_until, finished_at) VALUES ($1, $2, $3, $4, $5, "
        "CASE WHEN $6 THEN 'w:1:x' END, CASE WHEN $6 THEN now() + interval '1 hour' END, "
        "CASE WHEN $2 IN ('succeeded', 'dead', 'cancelled') THEN now() END) RETURNING id",
        task,
        state,
        attempts,
        max_attempts,
        last_error,
        running,
    )
    return job_id


async def _ran(
    pool: asyncpg.Pool, job_id: int, attempt: int, pid: int, start: float, end: float | None
) -> None:
    """An execution ``start``..``end`` seconds relative to the job's finished_at."""
    for event, offset in (("start", start), ("end", end)):
        if offset is None:
            continue
        await pool.execute(
            "INSERT INTO test_executions (job_id, attempt, worker_id, pid, event, at) "
            "SELECT $1, $2, 'w:' || $3::int || ':x', $3::int, $4, "
            "COALESCE(finished_at, now()) + make_interval(secs => $5) "
            "FROM outbox_jobs WHERE id = $1",
            job_id,
            attempt,
            pid,
            event,
            offset,
        )


async def _violations(pool: asyncpg.Pool, **kwargs: Any) -> str:
    with pytest.raises(AssertionError) as caught:
        await check_invariants(pool, **{"workers": [], **kwargs})
    return str(caught.value)


async def _clean(pool: asyncpg.Pool) -> None:
    await pool.execute("TRUNCATE outbox_jobs, test_executions")


# Each case breaks one invariant; the checker must name it. (One database for all: the
# tables are emptied between cases.)


async def _unfinished(pool: asyncpg.Pool) -> tuple[str, dict[str, Any]]:
    queued = await _job(pool, "queued", attempts=0)
    running = await _job(pool, "running", attempts=1)
    return f"job {queued} (sleepy) ended 'queued'|job {running} (sleepy) ended 'running'", {}


async def _dead_without_cause(pool: asyncpg.Pool) -> tuple[str, dict[str, Any]]:
    job = await _job(pool, "dead", last_error="  ")
    return f"job {job} is dead without a cause", {}


async def _lost(pool: asyncpg.Pool) -> tuple[str, dict[str, Any]]:
    job = await _job(pool)
    await _ran(pool, job, 1, 100, -1, -0.5)
    return f"committed jobs are missing: [{job + 1}]", {"expected_ids": [job, job + 1]}


async def _vanished(pool: asyncpg.Pool) -> tuple[str, dict[str, Any]]:
    await pool.execute(
        "INSERT INTO test_executions (job_id, attempt, worker_id, pid, event) "
        "VALUES (424242, 1, 'w:1:x', 1, 'run')"
    )
    return "no longer in the table: [424242]", {}


async def _unexplained_repeat(pool: asyncpg.Pool) -> tuple[str, dict[str, Any]]:
    job = await _job(pool, attempts=2)
    await _ran(pool, job, 1, 100, -5, None)
    await _ran(pool, job, 2, 200, -2, -1)
    return f"job {job} attempt 1 in process 100 was repeated, and nothing explains it", {}


async def _run_after_success(pool: asyncpg.Pool) -> tuple[str, dict[str, Any]]:
    job = await _job(pool, attempts=2)
    await _ran(pool, job, 2, 200, -2, -1)
    await _ran(pool, job, 1, 100, 1, 2)  # started a second after the job succeeded
    return "after the job finished", {"killed": [100]}  # killed, not stalled: no zombie


async def _same_attempt_twice(pool: asyncpg.Pool) -> tuple[str, dict[str, Any]]:
    job = await _job(pool, attempts=1)
    await _ran(pool, job, 1, 100, -5, None)
    await _ran(pool, job, 1, 200, -2, -1)
    return "a started attempt is always counted", {"killed": [100]}


async def _overlap_after_failure(pool: asyncpg.Pool) -> tuple[str, dict[str, Any]]:
    job = await _job(pool, attempts=2)
    await _ran(pool, job, 1, 100, -5, -2)
    await _ran(pool, job, 2, 200, -3, -1)  # started before attempt 1 ended
    failed = FakeWorker(100, [{"event": "job_failed", "job_id": job, "attempt": 1}])
    return "ran concurrently in processes 100 (attempt 1) and 200", {"workers": [failed]}


async def _attempts_out_of_range(pool: asyncpg.Pool) -> tuple[str, dict[str, Any]]:
    job = await _job(pool, attempts=1, max_attempts=1)
    await _ran(pool, job, 2, 100, -2, -1)  # an attempt the row never counted
    return (
        "ran attempt 2 but the row counts 1|ran attempt 2 of at most 1|"
        "succeeded with attempt 1, which never ran"
    ), {}


async def _twice_in_one_process(pool: asyncpg.Pool) -> tuple[str, dict[str, Any]]:
    job = await _job(pool, task="echo")
    for _ in range(2):
        await pool.execute(
            "INSERT INTO test_executions (job_id, attempt, worker_id, pid, event, at) "
            "VALUES ($1, 1, 'w:1:x', 100, 'run', now() - interval '1 hour')",
            job,
        )
    return "ran more than once in process 100", {}


async def _unhandled_error(pool: asyncpg.Pool) -> tuple[str, dict[str, Any]]:
    class Crashed(FakeWorker):
        def output(self) -> str:
            return "ERROR:asyncio:Task exception was never retrieved\nTraceback (most recent"

    return "wrote an unhandled error", {"workers": [Crashed(100, [])]}


BROKEN: list[Callable[[asyncpg.Pool], Awaitable[tuple[str, dict[str, Any]]]]] = [
    _unfinished,
    _dead_without_cause,
    _lost,
    _vanished,
    _unexplained_repeat,
    _run_after_success,
    _same_attempt_twice,
    _overlap_after_failure,
    _attempts_out_of_range,
    _twice_in_one_process,
    _unhandled_error,
]


async def test_every_broken_invariant_is_reported(pool: asyncpg.Pool) -> None:
    for case in BROKEN:
        await _clean(pool)
        expected, kwargs = await case(pool)
        message = await _violations(pool, **kwargs)
        for part in expected.split("|"):
            assert part in message, f"{case.__name__}: {part!r} not in {message}"


async def test_histories_with_an_explanation_pass(pool: asyncpg.Pool) -> None:
    # A crash: attempt 1 died with its process, attempt 2 finished elsewhere.
    job = await _job(pool, attempts=2)
    await _ran(pool, job, 1, 100, -5, None)
    await _ran(pool, job, 2, 200, -2, -1)
    report = await check_invariants(pool, workers=[], killed=[100], expected_ids=[job])
    assert report.repeats == {"crash": 1}
    assert report.moved == {job}

    # A failure the worker logged.
    await _clean(pool)
    job = await _job(pool, attempts=2)
    await _ran(pool, job, 1, 100, -5, -4)
    await _ran(pool, job, 2, 200, -2, -1)
    failed = FakeWorker(100, [{"event": "job_failed", "job_id": job, "attempt": 1}])
    assert (await check_invariants(pool, workers=[failed])).repeats == {"failed": 1}

    # A stalled worker's zombie: its stale attempt started after the job succeeded.
    await _clean(pool)
    job = await _job(pool, attempts=2)
    await _ran(pool, job, 2, 200, -2, -1)
    await _ran(pool, job, 1, 100, 1, 2)
    report = await check_invariants(pool, workers=[], stalled=[100])
    assert report.zombies == 1

    # A release on shutdown hands the job to another worker, the next attempt.
    await _clean(pool)
    job = await _job(pool, attempts=2)
    await _ran(pool, job, 1, 100, -5, None)
    await _ran(pool, job, 2, 200, -2, -1)
    released = FakeWorker(100, [{"event": "job_released", "job_id": job, "attempt": 1}])
    assert (await check_invariants(pool, workers=[released])).repeats == {"released": 1}

    # Concurrent runs across a lease expiry that another worker's rescuer logged.
    await _clean(pool)
    job = await _job(pool, attempts=2)
    await _ran(pool, job, 1, 100, -5, -2)
    await _ran(pool, job, 2, 200, -3, -1)
    rescuer = FakeWorker(200, [{"event": "job_rescued", "job_id": job, "attempt": 1}])
    report = await check_invariants(pool, workers=[rescuer])
    assert report.overlaps == 1
    assert report.repeats == {"lease_expired": 1}
