"""The tasks the tests of outbox_worker.testing enqueue, drain and perform, in a registry of
their own (registered in this process on import, so the module-level enqueue finds them); and
committing a job behind the helpers' back.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from outbox_worker import JobContext, Registry, current_correlation_id, enqueue

tasks = Registry()
# The test's pool, for handlers that act on the database behind their drain's back.
side_pool: contextvars.ContextVar[asyncpg.Pool] = contextvars.ContextVar("side_pool")


@tasks.task(queue="t_fast")
async def t_add(ctx: JobContext, a: int, b: int = 0) -> int:
    return a + b


@tasks.task(max_attempts=3)
async def t_fails(ctx: JobContext, message: str) -> None:
    raise RuntimeError(message)


@tasks.task()
async def t_chain(ctx: JobContext, n: int) -> int:
    """Enqueues the next link (n - 1) in the transaction that completes this one."""
    async with ctx.transaction() as conn:
        if n > 1:
            await conn.execute(
                "INSERT INTO outbox_jobs (task, args) VALUES ('t_chain', $1::jsonb)",
                json.dumps({"n": n - 1}),
            )
    return n


@tasks.task()
async def t_taken_over(ctx: JobContext) -> None:
    """Its row is taken by another worker while it runs (a rescuer after a lapsed lease)."""
    await side_pool.get().execute(
        "UPDATE outbox_jobs SET locked_by = 'another-worker' WHERE id = $1", ctx.job_id
    )


@tasks.task()
async def t_cancelled_meanwhile(ctx: JobContext) -> None:
    """An operator asks to cancel it while it runs; then it fails."""
    await side_pool.get().execute(
        "UPDATE outbox_jobs SET cancel_requested_at = now() WHERE id = $1", ctx.job_id
    )
    raise RuntimeError("stopped")


@tasks.task()
async def t_context(ctx: JobContext, **args: Any) -> dict[str, Any]:
    return {
        "args": args,
        "job_id": ctx.job_id,
        "task": ctx.task,
        "queue": ctx.queue,
        "attempt": ctx.attempt,
        "max_attempts": ctx.max_attempts,
        "correlation_id": ctx.correlation_id,
        "seen_correlation_id": current_correlation_id.get(),
        "cancel_requested": ctx.cancel_requested,
    }


@tasks.task()
async def t_writes(ctx: JobContext, note: str) -> str:
    async with ctx.transaction() as conn:
        await conn.execute("INSERT INTO test_effects (job_id, note) VALUES ($1, $2)", 7, note)
        ctx.result = note
    return note


@tasks.task()
async def t_writes_then_fails(ctx: JobContext) -> None:
    async with ctx.transaction() as conn:
        await conn.execute("INSERT INTO test_effects (job_id, note) VALUES (8, 'undone')")
        raise RuntimeError("after the write")


@tasks.task(timeout=0.05)
async def t_hangs(ctx: JobContext) -> None:
    await asyncio.Event().wait()


async def committed(engine: AsyncEngine, task: str, args: dict[str, Any], **options: Any) -> int:
    async with AsyncSession(engine) as session, session.begin():
        job = await enqueue(session, task, args, **options)
    return job.id
