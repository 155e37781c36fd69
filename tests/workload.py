"""Tasks the tests run, in worker processes and in-process. Each execution is written down
(``test_executions``) outside the job's own transaction, so repeats are visible."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import time
from typing import Any

import asyncpg
import structlog

from outbox_worker import CancelJob, JobContext, Registry, SnoozeJob

registry = Registry()

# A worker process that exits normally runs its exit hooks; one that leaves through
# os._exit (handlers it had to abandon) does not. Tests read this line to tell them apart;
# only worker processes the tests spawn write it (others keep their stderr to one line).
EXIT_HOOKS_RAN = "workload_exit_hooks_ran"
if os.environ.get("OUTBOX_TEST_EXIT_HOOK") == "1":
    atexit.register(lambda: print(EXIT_HOOKS_RAN, file=sys.stderr, flush=True))

EXECUTIONS_DDL = """
CREATE TABLE test_executions (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id     bigint NOT NULL,
    attempt    integer NOT NULL,
    worker_id  text NOT NULL,
    pid        integer NOT NULL,
    event      text NOT NULL,
    at         timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE test_effects (
    job_id     bigint PRIMARY KEY,
    note       text NOT NULL
);
"""

_connections: dict[str, asyncpg.Pool] = {}


async def _pool() -> asyncpg.Pool:
    dsn = os.environ["DATABASE_URL"]
    if dsn not in _connections:
        _connections[dsn] = await asyncpg.create_pool(dsn, min_size=0, max_size=4)
    return _connections[dsn]


async def record(ctx: JobContext, event: str = "run") -> None:
    pool = await _pool()
    await pool.execute(
        "INSERT INTO test_executions (job_id, attempt, worker_id, pid, event) "
        "VALUES ($1, $2, $3, $4, $5)",
        ctx.job_id,
        ctx.attempt,
        ctx.worker_id,
        os.getpid(),
        event,
    )


@registry.task()
async def noop(ctx: JobContext) -> None:
    return None


@registry.task()
async def echo(ctx: JobContext, **kwargs: Any) -> dict[str, Any]:
    await record(ctx)
    return kwargs


@registry.task(max_attempts=5)
async def flaky(ctx: JobContext, failures: int) -> str:
    """Fails its first ``failures`` attempts."""
    await record(ctx)
    if ctx.attempt <= failures:
        raise RuntimeError(f"planned failure {ctx.attempt} of {failures}")
    return "ok"


@registry.task(max_attempts=3)
async def always_fails(ctx: JobContext) -> None:
    await record(ctx)
    raise ValueError("this task always fails")


_running_here = 0


@registry.task()
async def counts_overlap(ctx: JobContext, seconds: float) -> int:
    """Returns how many handlers of this process were running when it started, itself included."""
    global _running_here
    _running_here += 1
    try:
        seen = _running_here
        await asyncio.sleep(seconds)
        return seen
    finally:
        _running_here -= 1


@registry.task(queue="slow")
async def sleepy(ctx: JobContext, seconds: float) -> str:
    await record(ctx, "start")
    await asyncio.sleep(seconds)
    await record(ctx, "end")
    return "slept"


@registry.task(timeout=0.5, max_attempts=2)
async def hangs(ctx: JobContext) -> None:
    await record(ctx)
    await asyncio.sleep(3600)


@registry.task()
async def blocks_loop(ctx: JobContext, seconds: float) -> None:
    await record(ctx)
    time.sleep(seconds)  # noqa: ASYNC251 -- blocking the event loop is the point


@registry.task()
async def write_once(ctx: JobContext, note: str, pause: float = 0.0) -> None:
    """Effectively-once: its row and its completion commit together."""
    await record(ctx)
    async with ctx.transaction() as conn:
        await conn.execute(
            "INSERT INTO test_effects (job_id, note) VALUES ($1, $2)", ctx.job_id, note
        )
        await asyncio.sleep(pause)
        ctx.result = {"note": note}


@registry.task()
async def whoami(ctx: JobContext, seconds: float = 0.0) -> str:
    """Returns the id of the worker that ran it (in-process tests: no DATABASE_URL needed)."""
    await asyncio.sleep(seconds)
    return ctx.worker_id


@registry.task()
async def takes_id(ctx: JobContext, user_id: int) -> int:
    return user_id


@registry.task()
async def chatty(ctx: JobContext, child: bool = False) -> None:
    """Logs through ctx.log, a plain structlog logger and the standard library's logging
    (at INFO, which the worker must not silence), and may enqueue a child."""
    ctx.log.info("chatty_ctx_log")
    structlog.get_logger("user_code").info("chatty_plain_log")
    logging.getLogger("user_code.stdlib").info("chatty_stdlib_log")
    if child:
        pool = await _pool()
        await pool.execute(
            "INSERT INTO outbox_jobs (task, correlation_id) VALUES ('noop', $1)", ctx.correlation_id
        )


# ---------------------------------------------------------------------------------------------
# Tasks of the fault-injection suite (tests/faults/) and of tests/test_hostile_worker.py
# ---------------------------------------------------------------------------------------------


@registry.task()
async def blocks_loop_once(ctx: JobContext, seconds: float) -> str:
    """Blocks the event loop on its first attempt only, between a start and an end record."""
    await record(ctx, "start")
    if ctx.attempt == 1:
        time.sleep(seconds)  # noqa: ASYNC251 -- blocking the event loop is the point
    await record(ctx, "end")
    return "unblocked"


@registry.task()
async def in_thread(ctx: JobContext, seconds: float = 0.05) -> str:
    """Blocking work done the recommended way, in asyncio.to_thread."""
    await asyncio.to_thread(time.sleep, seconds)
    return "slept in a thread"


@registry.task(timeout=0.5, max_attempts=2)
async def hangs_in_thread(ctx: JobContext, seconds: float) -> None:
    """Hangs in a thread: the timeout cancels the await, the thread runs on regardless."""
    await record(ctx)
    await asyncio.to_thread(time.sleep, seconds)


@registry.task()
async def deep_result(ctx: JobContext, depth: int) -> list[Any]:
    """Returns lists nested ``depth`` deep: too deep for json.dumps past ~1000."""
    await record(ctx)
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


class HandlerEscape(BaseException):
    """What a library may raise that is not an Exception (some timeout classes are)."""


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("this exception cannot be printed")


def _hostile_outcome(kind: str) -> Any:
    """What a hostile handler does, by name: the soak's mix uses the same names."""
    if kind == "nul_result":
        return {"a": "x\x00y"}
    if kind == "surrogate_result":
        return {"a": "x\ud800y"}
    if kind == "not_json":
        return {1, 2}
    if kind == "nul_error":
        raise ValueError("bad\x00byte")
    if kind == "surrogate_error":
        raise ValueError("bad\udc80byte")
    if kind == "unprintable_error":
        raise Unprintable
    if kind == "base_exception":
        raise HandlerEscape("escaped")
    if kind == "system_exit":
        raise SystemExit(3)
    if kind == "keyboard_interrupt":
        raise KeyboardInterrupt
    if kind == "cancels_itself":
        raise asyncio.CancelledError
    raise LookupError(f"no hostile kind {kind!r}")


@registry.task(max_attempts=3)
async def hostile(ctx: JobContext, kind: str) -> Any:
    """Returns what the database cannot store, or raises what a handler should not."""
    await record(ctx)
    return _hostile_outcome(kind)


@registry.task()
async def snoozy(ctx: JobContext, times: int) -> int:
    """Snoozes its first ``times`` runs; returns how many runs it took."""
    await record(ctx)
    pool = await _pool()
    runs: int = await pool.fetchval(
        "SELECT count(*) FROM test_executions WHERE job_id = $1", ctx.job_id
    )
    if runs <= times:
        raise SnoozeJob(0.05)
    return runs


@registry.task()
async def cancels(ctx: JobContext, reason: str) -> None:
    raise CancelJob(reason)


@registry.task()
async def slow_steps(ctx: JobContext, steps: int, seconds: float) -> int:
    """Reports its progress at every step, then waits ``seconds``."""
    for step in range(1, steps + 1):
        ctx.progress({"step": step, "of": steps})
        await asyncio.sleep(seconds)
    return steps
