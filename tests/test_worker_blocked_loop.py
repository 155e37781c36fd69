"""A worker process whose handler blocks the event loop: the block is detected and logged as
an error naming the job."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from tests.conftest import WorkerProcess
from tests.faults.invariants import log_events


async def test_blocked_event_loop_is_detected(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    w = spawn_worker("--lease-seconds", "1.5")
    await w.wait_for_log("worker_ready")
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args) "
        "VALUES ('blocks_loop', '{\"seconds\": 1.5}') RETURNING id"
    )
    await w.wait_for_log("event_loop_blocked", timeout=20)
    blocked = log_events(w, "event_loop_blocked")
    assert any(job_id in entry.get("jobs", []) for entry in blocked), blocked
    assert blocked[0]["level"] == "error"
