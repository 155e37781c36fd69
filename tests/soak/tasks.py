"""The soak's tasks: ``outbox-worker run tests.soak.tasks:registry``.

Every handler writes its execution into ``soak_executions`` on a pool of its own, outside
the job's transaction, before it does anything else and again when it ends. A crash between
the two leaves a started execution without an end, which is what lets the soak see
(and then explain) every repeat. Writes are idempotent per execution (a client-made
``exec_id``), so retrying one after a lost connection cannot invent a second execution.

The sample service's own tasks (``send_welcome_email``, ``generate_report``) are registered
here too, wrapped with the same log, so the jobs the HTTP API enqueues are checked as well.
``soak_hostile`` is what one bad job looks like: a result or an error the database cannot
store, a raise of what is not an Exception, args nested as deep as enqueue allows; the soak
checks that each costs its own job only, and is stored as tests/soak/hostile.py expects.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

import app.tasks as app_tasks
from outbox_worker import JobContext, LeaseLost, Registry
from outbox_worker.db import is_transient
from outbox_worker.registry import Handler

registry = Registry()

# Created by the soak before any worker starts. soak_transitions is filled by a trigger on
# outbox_jobs: every state change, with the row's owner and attempt before and after it, so
# a rescue, a failure, a release or a completion can be matched to the execution it ended,
# and a claim handed back unstarted told from the same worker's later claim of the same
# attempt; and any lowering of attempts, which only the hand-back of a claim never started
# may do.
SOAK_DDL = """
DROP TRIGGER IF EXISTS soak_transitions ON outbox_jobs;
DROP FUNCTION IF EXISTS soak_log_transition();
DROP TABLE IF EXISTS soak_executions, soak_transitions;
CREATE TABLE soak_executions (
    exec_id     uuid PRIMARY KEY,
    job_id      bigint NOT NULL,
    attempt     integer NOT NULL,
    task        text NOT NULL,
    worker_id   text NOT NULL,
    pid         integer NOT NULL,
    started_at  timestamptz NOT NULL,
    ended_at    timestamptz,
    outcome     text
);
CREATE INDEX soak_executions_job_idx ON soak_executions (job_id);
CREATE TABLE soak_transitions (
    seq              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id           bigint NOT NULL,
    old_state        text NOT NULL,
    new_state        text NOT NULL,
    old_attempts     integer NOT NULL,
    new_attempts     integer NOT NULL,
    old_locked_by    text,
    new_locked_by    text,
    old_locked_until timestamptz,
    new_last_error   text,
    at               timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX soak_transitions_job_idx ON soak_transitions (job_id);
CREATE FUNCTION soak_log_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO soak_transitions (job_id, old_state, new_state, old_attempts, new_attempts,
                                  old_locked_by, new_locked_by, old_locked_until,
                                  new_last_error)
    VALUES (OLD.id, OLD.state, NEW.state, OLD.attempts, NEW.attempts, OLD.locked_by,
            NEW.locked_by, OLD.locked_until, left(NEW.last_error, 300));
    RETURN NULL;
END
$$;
CREATE TRIGGER soak_transitions AFTER UPDATE ON outbox_jobs FOR EACH ROW
    WHEN (
        OLD.state IS DISTINCT FROM NEW.state
        OR (OLD.state = 'running' AND NEW.state = 'running'
            AND OLD.locked_by IS DISTINCT FROM NEW.locked_by)
        OR NEW.attempts < OLD.attempts
    )
    EXECUTE FUNCTION soak_log_transition();
"""

# How long a handler keeps retrying its own log writes through a restart or a killed
# connection before it gives up (and the attempt fails, to be retried like any other).
LOG_RETRY_SECONDS = 30.0

_pools: dict[tuple[str, int], asyncpg.Pool] = {}


class PlannedFailure(Exception):
    """A failure the soak asked for (transient: the job is retried)."""


class PoisonFailure(Exception):
    """A failure on every attempt: the job must end dead with this as its cause."""


async def _pool() -> asyncpg.Pool:
    key = (os.environ["DATABASE_URL"], id(asyncio.get_running_loop()))
    if key not in _pools:
        _pools[key] = await asyncpg.create_pool(
            key[0], min_size=0, max_size=3, max_inactive_connection_lifetime=60
        )
    return _pools[key]


def _lost_connection(exc: BaseException) -> bool:
    """The library's notion of transient, plus asyncpg's InternalClientError "another
    operation (2) is in progress": what a pooled connection whose backend the server
    terminated raises; the pool drops it on release."""
    return is_transient(exc) or (
        isinstance(exc, asyncpg.InternalClientError) and "another operation" in str(exc)
    )


async def _write(query: str, *args: Any) -> None:
    """One idempotent statement, retried through transient errors for a while."""
    deadline = time.monotonic() + LOG_RETRY_SECONDS
    delay = 0.05
    while True:
        try:
            pool = await _pool()
            await pool.execute(query, *args, timeout=10)
            return
        except Exception as exc:
            if not _lost_connection(exc) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


async def log_start(ctx: JobContext) -> uuid.UUID:
    exec_id = uuid.uuid4()
    started = datetime.now(UTC)  # the handler's entry, not when the row got through
    await _write(
        "INSERT INTO soak_executions (exec_id, job_id, attempt, task, worker_id, pid, "
        "started_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (exec_id) DO NOTHING",
        exec_id,
        ctx.job_id,
        ctx.attempt,
        ctx.task,
        ctx.worker_id,
        os.getpid(),
        started,
    )
    return exec_id


async def log_end(exec_id: uuid.UUID, outcome: str) -> None:
    await _write(
        "UPDATE soak_executions SET ended_at = $2, outcome = $3 WHERE exec_id = $1",
        exec_id,
        datetime.now(UTC),
        outcome,
    )


def logged(handler: Handler) -> Handler:
    """The handler, its execution written down: started, then how it ended.

    "cancelled" is a stop by the worker (a drain, a lease guard, a timeout): the task was
    asked to cancel. A CancelledError nobody asked for is the handler's own doing, and the
    worker fails the attempt for it, so it is logged as "fail" like any other raise.
    """

    @functools.wraps(handler)
    async def run(ctx: JobContext, **kwargs: Any) -> Any:
        exec_id = await log_start(ctx)
        try:
            value = await handler(ctx, **kwargs)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            stopped = task is not None and task.cancelling() > 0
            await log_end(exec_id, "cancelled" if stopped else "fail")
            raise
        except LeaseLost:
            await log_end(exec_id, "lease_lost")
            raise
        except BaseException:
            await log_end(exec_id, "fail")
            raise
        await log_end(exec_id, "ok")
        return value

    return run


@registry.task(max_attempts=5, timeout=120)
@logged
async def soak_work(ctx: JobContext, marker: str, ms: int = 0, fail: int = 0) -> None:
    """Takes ``ms`` milliseconds; fails its first ``fail`` attempts. The longest ones (past
    the lease) are the ones a row lock or a SIGTERM drain catches mid-run."""
    await asyncio.sleep(ms / 1000)
    if ctx.attempt <= fail:
        raise PlannedFailure(f"planned failure {ctx.attempt} of {fail} ({marker})")


@registry.task(max_attempts=3, timeout=60)
@logged
async def soak_poison(ctx: JobContext, marker: str) -> None:
    """Fails every attempt: ends dead."""
    raise PoisonFailure(f"poison job always fails ({marker})")


# Text PostgreSQL cannot store, in a jsonb result or a text error: the worker must store it
# with U+FFFD in place of the bad character (tests/soak/hostile.py knows what to expect).
UNSTORABLE = {"nul": "before\x00after", "surrogate": "before\ud800after"}


class HandlerEscape(BaseException):
    """What a library may raise that is not an Exception."""


# The hostile kinds, named as tests/workload.py names them, plus args nested as deep as
# enqueue accepts ("deep") and deeper than any Python reader decodes ("too_deep", written by
# plain SQL only: the worker must bury it without running it).
HOSTILE_KINDS = (
    "nul_result",
    "surrogate_result",
    "nul_error",
    "surrogate_error",
    "base_exception",
    "system_exit",
    "keyboard_interrupt",
    "cancels_itself",
    "deep",
    "too_deep",
)


def nesting(value: Any) -> int:
    """How many levels of lists ``value`` holds; a loop, so no depth overflows it."""
    levels = 0
    while isinstance(value, list):
        levels += 1
        value = value[0] if value else None
    return levels


@registry.task(max_attempts=3, timeout=60)
@logged
async def soak_hostile(
    ctx: JobContext, marker: str, kind: str, levels: int = 0, deep: Any = None
) -> Any:
    """Returns what the database cannot store, raises what a handler should not, or reports
    how deep the args it was given nest (``levels`` is how deep they were written)."""
    if kind in ("deep", "too_deep"):
        return nesting(deep)
    if kind == "nul_result":
        return {"text": UNSTORABLE["nul"]}
    if kind == "surrogate_result":
        return {"text": UNSTORABLE["surrogate"]}
    if kind == "nul_error":
        raise ValueError(UNSTORABLE["nul"])
    if kind == "surrogate_error":
        raise ValueError(UNSTORABLE["surrogate"])
    if kind == "base_exception":
        raise HandlerEscape("hostile")
    if kind == "system_exit":
        raise SystemExit("hostile")
    if kind == "keyboard_interrupt":
        raise KeyboardInterrupt("hostile")
    if kind == "cancels_itself":
        raise asyncio.CancelledError("hostile")
    raise LookupError(f"no hostile kind {kind!r} ({marker})")


for _spec in app_tasks.registry:
    registry.add(
        logged(_spec.handler),
        name=_spec.name,
        queue=_spec.queue,
        max_attempts=_spec.max_attempts,
        timeout=_spec.timeout,
        priority=_spec.priority,
    )
