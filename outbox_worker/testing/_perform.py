"""perform_job: one handler called with a real JobContext and no job row, so a handler can
be unit-tested without enqueueing or draining."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import structlog

from outbox_worker._worker.offload import HandlerThreads
from outbox_worker.config import asyncpg_dsn
from outbox_worker.context import JobContext, current_correlation_id
from outbox_worker.enqueue_checks import encode_args
from outbox_worker.enqueue_plans import default_max_args_bytes
from outbox_worker.errors import InvalidArgs, OutboxError, UnknownTask
from outbox_worker.registry import Registry


async def perform_job(
    registry: Registry,
    task: str,
    args: Mapping[str, Any] | None = None,
    *,
    database: str | asyncpg.Pool | asyncpg.Connection | None = None,
    job_id: int = 0,
    attempt: int = 1,
    correlation_id: str | None = None,
) -> Any:
    """Call ``task``'s handler once, as a worker would, with no job row; returns what it
    returns and raises what it raises.

    The args go through JSON as enqueued ones do (a tuple arrives as a list; what enqueue
    refuses is refused here, with its errors) and must fit the handler (else InvalidArgs);
    the task's timeout applies. The handler gets a real JobContext (``ctx.job_id`` is
    ``job_id``, 0 by default, which names no job), whose ``ctx.transaction()`` needs
    ``database`` (a URL, an asyncpg pool, or a connection: inside the connection's own
    transaction it becomes a savepoint) and commits the handler's writes alone, since no
    row is there to complete. Without ``database`` it raises OutboxError.

    A plain ``def`` handler runs in a thread, with the context a worker's thread gives it
    (no ``ctx.transaction()``; ``ctx.stopped`` once its timeout passed). So does a
    ``run_in="process"`` one, so that the test's mocks and fixtures reach it; :func:`drain`
    runs it in a child process, as a worker does.
    """
    spec = registry.get(task)
    if spec is None:
        raise UnknownTask(
            f"the registry has no task {task!r}; it has {sorted(s.name for s in registry)}"
        )
    decoded = json.loads(encode_args(task, {} if args is None else args, default_max_args_bytes()))
    misfit = spec.check_args(decoded)
    if misfit is not None:
        raise InvalidArgs(misfit)
    ctx = _RowlessContext(
        database=database,
        job_id=job_id,
        task=task,
        queue=spec.queue,
        attempt=attempt,
        max_attempts=spec.max_attempts,
        correlation_id=correlation_id,
        worker_id="perform_job",
        pool=None,
        log=structlog.get_logger("outbox_worker"),
    )

    async def run() -> Any:
        current_correlation_id.set(correlation_id)
        if spec.run_in == "loop":
            async with asyncio.timeout(spec.timeout):
                return await spec.handler(ctx, **decoded)
        threads = HandlerThreads(1)
        try:
            deadline = None if spec.timeout is None else asyncio.timeout(spec.timeout)
            return await threads.call(spec, ctx, decoded, deadline)
        finally:
            threads.close()

    # A task of its own, as the worker runs a job: the correlation id set for the handler
    # stays out of the caller's context.
    return await asyncio.create_task(run())


class _RowlessContext(JobContext):
    """A JobContext with no job row behind it: ``transaction()`` commits the handler's writes
    and completes nothing."""

    def __init__(
        self, *, database: str | asyncpg.Pool | asyncpg.Connection | None, **context: Any
    ) -> None:
        super().__init__(**context)
        self._database = database

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        if self._database is None:
            raise OutboxError(
                "ctx.transaction() needs a database: pass perform_job(..., database=...) "
                "a database URL, an asyncpg pool or a connection"
            )
        if self._transaction_used:
            raise OutboxError(
                "ctx.transaction() can be used only once per attempt (run by a worker, it "
                "completes the job)"
            )
        self._transaction_used = True
        async with _connection(self._database) as conn, conn.transaction():
            yield conn
        self.completed_in_transaction = True


@asynccontextmanager
async def _connection(
    database: str | asyncpg.Pool | asyncpg.Connection,
) -> AsyncIterator[asyncpg.Connection]:
    if isinstance(database, str):
        conn = await asyncpg.connect(asyncpg_dsn(database))
        try:
            yield conn
        finally:
            await conn.close()
    elif isinstance(database, asyncpg.Pool):
        async with database.acquire() as conn:
            yield conn
    else:
        yield database
