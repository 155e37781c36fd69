"""Every log line written inside a job carries job_id, task, attempt and correlation_id,
whether the handler logs through ctx.log, structlog or the standard library, whose INFO
lines the worker must not silence."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from typing import Any

import asyncpg

from tests.conftest import WorkerProcess, wait_until


async def test_job_log_lines_carry_the_job_fields(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    job_id = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args, correlation_id) "
        "VALUES ('chatty', '{\"child\": true}', 'req-42') RETURNING id"
    )
    worker = spawn_worker("--burst")
    assert worker.wait() == 0
    lines: list[dict[str, Any]] = [
        json.loads(line) for line in worker.output().splitlines() if line.startswith("{")
    ]
    for event in ("chatty_ctx_log", "chatty_plain_log", "chatty_stdlib_log"):
        [line] = [entry for entry in lines if entry["event"] == event]
        assert line["job_id"] == job_id
        assert line["task"] == "chatty"
        assert line["attempt"] == 1
        assert line["correlation_id"] == "req-42"
        assert line["level"] == "info"
        assert "worker_id" in line or event != "chatty_ctx_log"
    [stdlib] = [entry for entry in lines if entry["event"] == "chatty_stdlib_log"]
    assert stdlib["logger"] == "user_code.stdlib"
    # The worker's own lines outside any job carry no job fields.
    [ready] = [entry for entry in lines if entry["event"] == "worker_ready"]
    assert "job_id" not in ready
    child = await pool.fetchrow("SELECT state, correlation_id FROM outbox_jobs WHERE task = 'noop'")
    assert child["correlation_id"] == "req-42"
    assert child["state"] == "succeeded"


async def test_failure_is_logged_with_its_job(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    job_id = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, max_attempts) VALUES ('always_fails', 1) RETURNING id"
    )
    worker = spawn_worker()
    await wait_until(
        lambda: pool.fetchval("SELECT state = 'dead' FROM outbox_jobs WHERE id = $1", job_id),
        what="the job to die",
    )
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    lines = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    [failed] = [entry for entry in lines if entry["event"] == "job_failed"]
    assert failed["job_id"] == job_id
    assert failed["final"] is True
    assert failed["error"] == "ValueError: this task always fails"
