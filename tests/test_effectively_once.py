"""A handler's database writes and its job's completion commit together."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import asyncpg

from tests.conftest import WorkerProcess, wait_until


async def test_kill_9_inside_the_transaction_never_writes_twice(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    job_id = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args) "
        'VALUES (\'write_once\', \'{"note": "paid", "pause": 3}\') RETURNING id'
    )
    first = spawn_worker("--lease-seconds", "1")
    # The handler has written its row and is pausing inside the transaction: kill it there.
    await wait_until(
        lambda: pool.fetchval("SELECT count(*) FROM test_executions WHERE job_id = $1", job_id),
        what="the first execution",
    )
    await asyncio.sleep(0.5)
    first.signal(signal.SIGKILL)
    first.wait()

    second = spawn_worker("--lease-seconds", "1")
    state = await wait_until(
        lambda: pool.fetchval(
            "SELECT state FROM outbox_jobs WHERE id = $1 AND state = 'succeeded'", job_id
        ),
        timeout=60,
        what="the job to succeed on the second worker",
    )
    assert state == "succeeded"
    executions = await pool.fetch(
        "SELECT attempt, pid FROM test_executions WHERE job_id = $1 ORDER BY seq", job_id
    )
    assert [(r["attempt"], r["pid"]) for r in executions] == [(1, first.pid), (2, second.pid)]
    effects = await pool.fetch("SELECT note FROM test_effects WHERE job_id = $1", job_id)
    assert [r["note"] for r in effects] == ["paid"]
    row = await pool.fetchrow(
        "SELECT attempts, result::text AS result FROM outbox_jobs WHERE id = $1", job_id
    )
    assert row["attempts"] == 2
    assert row["result"] == '{"note": "paid"}'
    second.signal(signal.SIGTERM)
    assert second.wait() == 0
