"""A handler decides how its attempt ends: snooze (no attempt spent, bounded), cancel with a
reason, retry at a time it chooses; and a task's retry policy (its backoff, the exceptions
that retry and those that go dead at once). Run through the worker's executor and fenced
statements (outbox_worker.testing.drain), and once in a worker process."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import timedelta

import asyncpg
import pytest

from outbox_worker import (
    CancelJob,
    JobContext,
    Registry,
    RetryJob,
    RetryPolicy,
    SnoozeJob,
    TaskDefinitionError,
)
from outbox_worker._worker.completer import outcome_statement
from outbox_worker._worker.outcomes import Cancelled, Snoozed
from outbox_worker.testing import DrainResult, drain
from tests.conftest import WorkerProcess, wait_until

control = Registry()


@control.task
async def snoozes(ctx: JobContext, seconds: float) -> str:
    raise SnoozeJob(seconds)


@control.task(retry=RetryPolicy(max_snoozes=2))
async def snoozes_a_lot(ctx: JobContext) -> None:
    raise SnoozeJob(0)


@control.task
async def cancels(ctx: JobContext, reason: str) -> None:
    raise CancelJob(reason)


@control.task(max_attempts=2)
async def retries(ctx: JobContext, seconds: float) -> None:
    raise RetryJob(seconds, "the provider said: later")


@control.task(retry=RetryPolicy(backoff=lambda attempt: 40.0 + attempt))
async def fixed_backoff(ctx: JobContext) -> None:
    raise RuntimeError("down")


@control.task(retry=RetryPolicy(retry_on=(ConnectionError,), give_up_on=(ConnectionRefusedError,)))
async def picky(ctx: JobContext, kind: str) -> None:
    errors: dict[str, Exception] = {
        "reset": ConnectionResetError("reset by peer"),
        "refused": ConnectionRefusedError("refused"),
        "bug": KeyError("customer_id"),
    }
    raise errors[kind]


@control.task(retry=RetryPolicy(backoff=lambda attempt: math.nan))
async def bad_backoff(ctx: JobContext) -> None:
    raise RuntimeError("down")


async def enqueue(pool: asyncpg.Pool, task: str, args: str = "{}", max_attempts: int = 5) -> int:
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args, max_attempts) VALUES ($1, $2::jsonb, $3)"
        " RETURNING id",
        task,
        args,
        max_attempts,
    )
    return job_id


async def row(pool: asyncpg.Pool, job_id: int) -> asyncpg.Record:
    found = await pool.fetchrow(
        "SELECT state, attempts, snoozes, last_error, finished_at, locked_by,"
        " run_at - now() AS due_in FROM outbox_jobs WHERE id = $1",
        job_id,
    )
    assert found is not None
    return found


async def test_a_snoozed_job_waits_without_spending_an_attempt(pool: asyncpg.Pool) -> None:
    job_id = await enqueue(pool, "snoozes", '{"seconds": 30}')
    assert await drain(control, pool) == DrainResult(snoozed=1, job_ids=(job_id,))
    snoozed = await row(pool, job_id)
    assert (snoozed["state"], snoozed["attempts"], snoozed["snoozes"]) == ("queued", 0, 1)
    assert timedelta(seconds=28) < snoozed["due_in"] <= timedelta(seconds=30)
    assert snoozed["locked_by"] is None
    assert snoozed["finished_at"] is None
    # Claimable again when due, at the same attempt number.
    await pool.execute("UPDATE outbox_jobs SET run_at = now() WHERE id = $1", job_id)
    assert await drain(control, pool, limit=1) == DrainResult(snoozed=1, job_ids=(job_id,))
    assert (await row(pool, job_id))["attempts"] == 0


async def test_snoozing_past_the_tasks_bound_goes_dead(pool: asyncpg.Pool) -> None:
    job_id = await enqueue(pool, "snoozes_a_lot")
    result = await drain(control, pool)
    assert result == DrainResult(snoozed=2, dead=1, job_ids=(job_id,) * 3)
    dead = await row(pool, job_id)
    assert (dead["state"], dead["snoozes"], dead["attempts"]) == ("dead", 3, 1)
    assert dead["last_error"] == "snoozed 3 times: the task allows 2"
    assert dead["finished_at"] is not None


async def test_a_handler_cancels_its_job_with_a_reason(pool: asyncpg.Pool) -> None:
    job_id = await enqueue(pool, "cancels", '{"reason": "the account was closed"}')
    assert await drain(control, pool) == DrainResult(cancelled=1, job_ids=(job_id,))
    cancelled = await row(pool, job_id)
    assert (cancelled["state"], cancelled["attempts"]) == ("cancelled", 1)
    assert cancelled["last_error"] == "the account was closed"
    assert cancelled["finished_at"] is not None
    assert await drain(control, pool) == DrainResult(), "a cancelled job is not retried"


async def test_a_handler_retries_at_the_time_it_chooses_and_the_attempt_counts(
    pool: asyncpg.Pool,
) -> None:
    job_id = await enqueue(pool, "retries", '{"seconds": 90}', max_attempts=2)
    assert await drain(control, pool) == DrainResult(retried=1, job_ids=(job_id,))
    retried = await row(pool, job_id)
    assert (retried["state"], retried["attempts"]) == ("queued", 1)
    assert timedelta(seconds=88) < retried["due_in"] <= timedelta(seconds=90)
    assert retried["last_error"] == "RetryJob: the provider said: later"
    await pool.execute("UPDATE outbox_jobs SET run_at = now() WHERE id = $1", job_id)
    assert await drain(control, pool) == DrainResult(dead=1, job_ids=(job_id,))
    assert (await row(pool, job_id))["state"] == "dead"


async def test_a_tasks_backoff_sets_the_retry_time(pool: asyncpg.Pool) -> None:
    job_id = await enqueue(pool, "fixed_backoff")
    assert await drain(control, pool) == DrainResult(retried=1, job_ids=(job_id,))
    due_in = (await row(pool, job_id))["due_in"]
    assert timedelta(seconds=39) < due_in <= timedelta(seconds=41)


async def test_a_backoff_that_answers_nonsense_falls_back_to_the_workers(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUTBOX_RETRY_BASE_SECONDS", "5")
    monkeypatch.setenv("OUTBOX_RETRY_CAP_SECONDS", "5")
    job_id = await enqueue(pool, "bad_backoff")
    assert await drain(control, pool) == DrainResult(retried=1, job_ids=(job_id,))
    due_in = (await row(pool, job_id))["due_in"]
    assert timedelta(seconds=2) < due_in <= timedelta(seconds=5)


async def test_the_policy_picks_which_failures_retry(pool: asyncpg.Pool) -> None:
    reset = await enqueue(pool, "picky", '{"kind": "reset"}')
    refused = await enqueue(pool, "picky", '{"kind": "refused"}')
    bug = await enqueue(pool, "picky", '{"kind": "bug"}')
    result = await drain(control, pool)
    assert (result.retried, result.dead) == (1, 2)
    assert (await row(pool, reset))["state"] == "queued"  # a ConnectionError: retried
    for job_id in (refused, bug):  # given up on, or not among those retried: dead at once
        dead = await row(pool, job_id)
        assert (dead["state"], dead["attempts"]) == ("dead", 1)
    assert (await row(pool, bug))["last_error"].startswith("KeyError: 'customer_id'")


async def test_snooze_and_cancel_are_fenced(pool: asyncpg.Pool) -> None:
    """Written about an attempt the worker no longer holds (the row now runs attempt 2 for
    another worker), neither changes the row."""
    job_id = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, state, attempts, locked_by, locked_until)"
        " VALUES ('snoozes', 'running', 2, 'other-worker', now() + interval '30 seconds')"
        " RETURNING id"
    )
    columns = ("state", "attempts", "snoozes", "last_error", "locked_by")
    before = [(await row(pool, job_id))[c] for c in columns]
    for attempt, worker in ((1, "other-worker"), (2, "this-worker")):
        for late in (Snoozed(job_id, attempt, 5.0, 10), Cancelled(job_id, attempt, "too late")):
            assert await pool.fetch(*outcome_statement([late], worker)) == []
    assert [(await row(pool, job_id))[c] for c in columns] == before
    # The holder's own write does apply.
    assert await pool.fetch(*outcome_statement([Snoozed(job_id, 2, 5.0, 10)], "other-worker"))
    assert (await row(pool, job_id))["snoozes"] == 1


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: SnoozeJob(-1), ValueError),
        (lambda: SnoozeJob(math.inf), ValueError),
        (lambda: SnoozeJob("soon"), TypeError),  # type: ignore[arg-type]
        (lambda: RetryJob(366 * 24 * 3600 + 1), ValueError),
        (lambda: CancelJob(42), TypeError),  # type: ignore[arg-type]
        (lambda: RetryPolicy(retry_on=[ValueError]), TaskDefinitionError),  # type: ignore[arg-type]
        (lambda: RetryPolicy(give_up_on=(ValueError, "OSError")), TaskDefinitionError),  # type: ignore[arg-type]
        (lambda: RetryPolicy(max_snoozes=-1), TaskDefinitionError),
        (lambda: RetryPolicy(backoff=30), TaskDefinitionError),  # type: ignore[arg-type]
    ],
)
def test_control_and_policies_refuse_nonsense_when_made(
    make: Callable[[], object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        make()


async def test_a_worker_process_writes_snoozes_and_cancels(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    snoozy = await enqueue(pool, "snoozy", '{"times": 2}')
    cancelled = await enqueue(pool, "cancels", '{"reason": "not wanted"}')
    worker = spawn_worker("--poll-interval-seconds", "0.1")

    async def finished() -> bool:
        states = await pool.fetch(
            "SELECT state FROM outbox_jobs WHERE id = ANY($1::bigint[])", [snoozy, cancelled]
        )
        return {r["state"] for r in states} <= {"succeeded", "cancelled"}

    await wait_until(finished, timeout=30, what="the snoozed job to succeed")
    done = await pool.fetchrow(
        "SELECT state, attempts, snoozes, result FROM outbox_jobs WHERE id = $1", snoozy
    )
    assert (done["state"], done["attempts"], done["snoozes"], done["result"]) == (
        "succeeded",
        1,
        2,
        "3",
    )
    gone = await pool.fetchrow("SELECT state, last_error FROM outbox_jobs WHERE id = $1", cancelled)
    assert (gone["state"], gone["last_error"]) == ("cancelled", "not wanted")
    worker.kill()
