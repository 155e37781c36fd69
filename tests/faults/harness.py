"""Helpers of the fault suite: enqueue over time, find who runs what, wait for the queue to
drain, stop workers, and talk to a database that may be restarting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import asyncpg

from tests.conftest import WorkerProcess, wait_until
from tests.faults.invariants import log_events
from tests.support import DOWN

T = TypeVar("T")

# Worker flags for quick faults: short leases (rescue within ~2 s), fast polling.
FAST = ("--lease-seconds", "1", "--poll-interval-seconds", "0.2")
# For the workers that rescue a stalled one: a lease that does not lapse on a loaded
# machine, and a rescue every 1.5 s.
STEADY = ("--lease-seconds", "3", "--poll-interval-seconds", "0.2")
# For tests whose fault is not a lost lease: no lease lapses even on a loaded machine.
CALM = ("--lease-seconds", "10", "--poll-interval-seconds", "0.2")


def pid_of(worker_id: str) -> int:
    """Worker ids are ``host:pid:random``."""
    return int(worker_id.rsplit(":", 2)[1])


async def insert_jobs(
    pool: asyncpg.Pool,
    task: str,
    count: int,
    args: str = "{}",
    queue: str = "default",
    max_attempts: int = 5,
) -> list[int]:
    """Plain SQL inserts (the column default of max_attempts is 5, whatever the task says)."""
    rows = await pool.fetch(
        "INSERT INTO outbox_jobs (queue, task, args, max_attempts) "
        "SELECT $1, $2, $3::jsonb, $5 FROM generate_series(1, $4) RETURNING id",
        queue,
        task,
        args,
        count,
        max_attempts,
    )
    return sorted(r["id"] for r in rows)


async def insert_mixed(
    pool: asyncpg.Pool, jobs: list[tuple[str, dict[str, Any]]], max_attempts: int = 5
) -> list[int]:
    """Jobs of several tasks in one plain SQL statement, so that one worker claims them in
    one go and their outcomes share its batches. Ids in the order given."""
    rows = await pool.fetch(
        "INSERT INTO outbox_jobs (task, args, max_attempts) "
        "SELECT t, a::jsonb, $3 FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(t, a, o) "
        "ORDER BY o RETURNING id",
        [task for task, _ in jobs],
        [json.dumps(args) for _, args in jobs],
        max_attempts,
    )
    return sorted(r["id"] for r in rows)  # identities are drawn in insertion order


async def insert_sleepy(pool: asyncpg.Pool, count: int, seconds: float) -> list[int]:
    return await insert_jobs(pool, "sleepy", count, f'{{"seconds": {seconds}}}', "slow")


async def busy_pids(pool: asyncpg.Pool, task: str | None = None) -> dict[int, list[int]]:
    """Processes holding a running job whose current attempt's handler has started and not
    ended, with those jobs: killing one of them interrupts a handler."""
    rows = await pool.fetch(
        "SELECT j.id, j.locked_by FROM outbox_jobs j "
        "WHERE j.state = 'running' AND ($1::text IS NULL OR j.task = $1) "
        "AND EXISTS (SELECT 1 FROM test_executions e WHERE e.job_id = j.id "
        "            AND e.attempt = j.attempts AND e.event IN ('start', 'run')) "
        "AND NOT EXISTS (SELECT 1 FROM test_executions e WHERE e.job_id = j.id "
        "                AND e.attempt = j.attempts AND e.event = 'end')",
        task,
    )
    busy: dict[int, list[int]] = {}
    for row in rows:
        busy.setdefault(pid_of(row["locked_by"]), []).append(row["id"])
    return busy


# How a stale attempt of a worker that outlived its lease (stopped, blocked) ends harmlessly
# once it wakes: its completion refused by the fence, or its handler stopped by the lease
# guard first. Which comes first is a race; either changes nothing.
STALE_ENDINGS = ("outcome_dropped_lease_lost", "job_stopped_lease_lapsing")


async def stale_attempts_ended(worker: WorkerProcess, jobs: Iterable[int]) -> bool:
    return set(jobs) <= {e["job_id"] for e in log_events(worker, *STALE_ENDINGS)}


async def unfinished(pool: asyncpg.Pool) -> int:
    n: int = await pool.fetchval(
        "SELECT count(*) FROM outbox_jobs WHERE state IN ('queued', 'running')"
    )
    return n


async def settle(pool: asyncpg.Pool, timeout: float = 60, what: str = "") -> None:
    """Wait until no job is queued or running."""

    async def drained() -> bool:
        return await unfinished(pool) == 0

    await wait_until(drained, timeout=timeout, interval=0.1, what=what or "the queue to drain")


async def stop_workers(workers: Iterable[WorkerProcess], timeout: float = 30) -> None:
    """SIGTERM every live worker (waking stopped ones first); each must exit 0."""
    live = [w for w in workers if w.proc.poll() is None]
    for worker in live:
        worker.signal(signal.SIGCONT)
        worker.signal(signal.SIGTERM)
    for worker in live:
        code = await asyncio.to_thread(worker.wait, timeout)
        assert code == 0, f"worker {worker.pid} exited {code}:\n{worker.output()[-4000:]}"


async def kill(worker: WorkerProcess) -> int:
    worker.signal(signal.SIGKILL)
    code = await asyncio.to_thread(worker.wait, 10)
    assert code == -signal.SIGKILL
    return worker.pid


async def fetch_retrying(url: str, query: str, *args: Any, timeout: float = 60) -> list[Any]:
    """One statement on a fresh connection, retried while the server is away."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            conn = await asyncpg.connect(url, timeout=5)
            try:
                rows: list[Any] = await conn.fetch(query, *args, timeout=10)
                return rows
            finally:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)
        except DOWN:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def through_restarts(pool: asyncpg.Pool, unit: Callable[[], Awaitable[T]]) -> T:
    """Run ``unit`` on the pool, replacing connections the server dropped, until it answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        try:
            return await unit()
        except DOWN:
            if loop.time() > deadline:
                raise
            await pool.expire_connections()
            await asyncio.sleep(0.2)
