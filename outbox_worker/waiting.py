"""Waiting for a job to finish, from a request handler or a script: what ARQ's
``job.result(timeout)`` and Celery's ``AsyncResult.get()`` give, on PostgreSQL alone.

The waiter LISTENs on ``outbox_job_done``, then marks the job (``notify_done``), and a
trigger sends the job's id when it finishes (migration pgoutbox_0009). A notification is a
hint, as everywhere in pgoutbox: the waiter reads the row again at least every
``poll_interval``, so a lost notification, or a connection through PgBouncer in transaction
mode (where LISTEN hears nothing), costs latency, never the answer.

A job is finished when it is ``succeeded``, ``dead`` or ``cancelled``; a failed attempt that
will be retried is not an end, so the wait goes on through retries.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg

from outbox_worker import sql
from outbox_worker.config import asyncpg_dsn
from outbox_worker.db import sleep_or_stop
from outbox_worker.errors import JobNotFound, JobWaitTimeout
from outbox_worker.jobs import MAX_JOB_ID, Job

DEFAULT_POLL_INTERVAL = 1.0


async def wait_for_job(
    database: str | asyncpg.Pool | asyncpg.Connection,
    job_id: int,
    *,
    timeout: float,  # noqa: ASYNC109 (the wait is the API: ARQ's result(timeout))
    poll_interval: float = DEFAULT_POLL_INTERVAL,
) -> Job:
    """The job once it has finished (its ``state``, ``result`` or ``last_error``), or
    :class:`JobWaitTimeout` after ``timeout`` seconds (the job goes on regardless).

    ``database`` is a database URL (a connection is opened for the wait and closed after),
    an asyncpg pool (one of its connections is held for the wait) or an asyncpg connection
    outside any transaction. The job must be committed: wait after the enqueueing
    transaction, never inside it. :class:`JobNotFound` if no job has that id.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0:
        raise ValueError(f"timeout must be a number of seconds, 0 or more, not {timeout!r}")
    if not (isinstance(poll_interval, int | float) and 0 < poll_interval <= 60):
        raise ValueError(f"poll_interval must be over 0 and at most 60 s, not {poll_interval!r}")
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 0 < job_id <= MAX_JOB_ID:
        raise JobNotFound(f"no job {job_id!r}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with _connection(database) as conn:
        finished = asyncio.Event()

        def heard(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            if payload == str(job_id):
                finished.set()

        await conn.add_listener(sql.DONE_CHANNEL, heard)
        try:
            job = await _read(conn, job_id)
            if not job.state.finished:
                await conn.execute(*sql.bind(sql.JOB_WATCH, id=job_id))
                job = await _read(conn, job_id)
            while not job.state.finished:
                left = deadline - loop.time()
                if left <= 0:
                    raise JobWaitTimeout(
                        f"job {job_id} did not finish within {timeout:g}s: it is {job.state}"
                        f" (attempt {job.attempts} of {job.max_attempts})"
                    )
                await sleep_or_stop(finished, min(poll_interval, left))
                finished.clear()
                job = await _read(conn, job_id)
            return job
        finally:
            with contextlib.suppress(Exception):
                await conn.remove_listener(sql.DONE_CHANNEL, heard)


async def _read(conn: asyncpg.Connection, job_id: int) -> Job:
    row = await conn.fetchrow(*sql.bind(sql.JOB_GET_PG, id=job_id))
    if row is None:
        raise JobNotFound(f"no job {job_id}")
    return Job.from_row(row)


@contextlib.asynccontextmanager
async def _connection(
    database: str | asyncpg.Pool | asyncpg.Connection,
) -> AsyncIterator[asyncpg.Connection]:
    if isinstance(database, asyncpg.Connection):
        yield database
    elif isinstance(database, asyncpg.Pool):
        async with database.acquire() as conn:
            yield conn
    elif isinstance(database, str):
        conn = await asyncpg.connect(asyncpg_dsn(database))
        try:
            yield conn
        finally:
            await conn.close()
    else:
        raise TypeError(
            "wait_for_job takes a database URL, an asyncpg pool or an asyncpg connection, "
            f"not {type(database).__name__}"
        )
