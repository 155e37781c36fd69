"""The worker's start-up check of its LISTEN connection: through PgBouncer in transaction
mode LISTEN hears nothing, which the worker says once, in one warning line, and then serves
by polling; on a direct URL the check passes and says nothing above debug."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import pytest

from tests.conftest import WorkerProcess, wait_until
from tests.pgbouncer.conftest import ListenMode
from tests.test_retries import log_events, stop


@pytest.mark.parametrize("listen_mode", ["pooled", "direct"])
async def test_a_listen_that_hears_nothing_is_one_warning_and_polling_goes_on(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess], listen_mode: ListenMode
) -> None:
    worker = spawn_worker("--poll-interval-seconds", "0.2")
    found = await worker.wait_for_log('"listen_verified"', '"listen_unverified"')
    job_id = await pool.fetchval("INSERT INTO outbox_jobs (task) VALUES ('noop') RETURNING id")
    await wait_until(
        lambda: pool.fetchval("SELECT state = 'succeeded' FROM outbox_jobs WHERE id = $1", job_id),
        what="the job to succeed",
    )
    await asyncio.sleep(2)  # a few keepalives of the LISTEN connection: no second warning
    await stop(worker)

    warnings = [e for e in log_events(worker) if e["event"] == "listen_unverified"]
    if listen_mode == "direct":
        assert found == '"listen_verified"'
        assert warnings == []
        return
    assert found == '"listen_unverified"'
    [warning] = warnings
    assert warning["level"] == "warning"
    assert "PgBouncer in transaction mode" in warning["reason"]
    assert warning["hint"].startswith("relying on polling every 0.2s")
    assert warning["listen_at"].startswith("127.0.0.1:")
