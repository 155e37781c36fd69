"""The admin service through its HTTP face, the JSON routes of
``outbox_worker.web.create_admin_router`` on the library's own host (``admin_host``): retry
and cancel (of a running job too), one job at a time and dead jobs in bulk, as the state
machine allows."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from outbox_worker import sql
from tests.admin_support import AUTH, insert_job
from tests.conftest import WorkerProcess, wait_until


async def test_retry_and_cancel_follow_the_state_machine(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    dead = await insert_job(
        pool, "echo", state="dead", attempts=5, max_attempts=5, last_error="boom"
    )
    done = await insert_job(pool, "echo", state="succeeded", attempts=1)
    queued = await insert_job(pool, "echo")

    retried = (await admin_client.post(f"/jobs/{dead}/retry", headers=AUTH)).json()
    assert (retried["state"], retried["attempts"], retried["max_attempts"]) == ("queued", 5, 6)
    assert retried["last_error"] == "boom"  # history is kept
    refused = await admin_client.post(f"/jobs/{done}/retry", headers=AUTH)
    assert refused.status_code == 409
    assert "succeeded" in refused.json()["detail"]

    cancelled = (await admin_client.post(f"/jobs/{queued}/cancel", headers=AUTH)).json()
    assert cancelled["state"] == "cancelled"
    assert cancelled["finished_at"] is not None
    again = await admin_client.post(f"/jobs/{queued}/cancel", headers=AUTH)
    assert again.status_code == 409
    finished = await admin_client.post(f"/jobs/{done}/cancel", headers=AUTH)
    assert finished.status_code == 409
    # A cancelled job may be retried.
    assert (await admin_client.post(f"/jobs/{queued}/retry", headers=AUTH)).json()[
        "state"
    ] == "queued"
    rows = {r["id"]: r["state"] for r in await pool.fetch("SELECT id, state FROM outbox_jobs")}
    assert rows == {dead: "queued", done: "succeeded", queued: "queued"}


async def test_bulk_retry_of_dead_jobs_by_filter(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    echo_dead = [
        await insert_job(pool, "echo", state="dead", attempts=1, max_attempts=1) for _ in range(3)
    ]
    noop_dead = await insert_job(pool, "noop", state="dead", attempts=1, max_attempts=1)
    response = await admin_client.post("/jobs/retry-dead", params={"task": "echo"}, headers=AUTH)
    assert sorted(response.json()["retried"]) == echo_dead
    states = {r["id"]: r["state"] for r in await pool.fetch("SELECT id, state FROM outbox_jobs")}
    assert states == {**dict.fromkeys(echo_dead, "queued"), noop_dead: "dead"}


async def test_cancel_of_a_running_job_stops_its_handler(
    admin_app: FastAPI,
    admin_client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    job_id = await insert_job(pool, "sleepy", queue="slow", args=json.dumps({"seconds": 60}))
    worker = spawn_worker("--lease-seconds", "1.5")
    await wait_until(
        lambda: pool.fetchval(
            "SELECT count(*) FROM test_executions WHERE job_id = $1 AND event = 'start'", job_id
        ),
        what="the job to start",
    )
    asked = (await admin_client.post(f"/jobs/{job_id}/cancel", headers=AUTH)).json()
    assert asked["state"] == "running"
    assert asked["cancel_requested_at"] is not None
    await wait_until(
        lambda: pool.fetchval("SELECT state = 'cancelled' FROM outbox_jobs WHERE id = $1", job_id),
        what="the worker to cancel the job",
    )
    row = await pool.fetchrow(
        "SELECT locked_by, finished_at FROM outbox_jobs WHERE id = $1", job_id
    )
    assert row["locked_by"] is None
    assert row["finished_at"] is not None
    events = [
        r["event"]
        for r in await pool.fetch(
            "SELECT event FROM test_executions WHERE job_id = $1 ORDER BY seq", job_id
        )
    ]
    assert events == ["start"]  # stopped, never reached its end
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert '"job_cancelled"' in worker.output()


@pytest.mark.parametrize("leaves_by", ["fail", "release", "rescue"])
async def test_a_requested_cancel_wins_however_the_attempt_ends(
    pool: asyncpg.Pool, leaves_by: str
) -> None:
    job_id = await insert_job(pool, "echo")
    [claimed] = await pool.fetch(sql.JOB_CLAIM, ["default"], 1, 0, "w1", 30.0)
    await pool.execute("UPDATE outbox_jobs SET cancel_requested_at = now() WHERE id = $1", job_id)
    if leaves_by == "fail":
        await pool.fetch(sql.JOB_FAIL_MANY, [job_id], [1], ["boom"], [0.0], [False], "w1")
    elif leaves_by == "release":
        await pool.fetch(sql.JOB_RELEASE_MANY, [job_id], [1], "w1")
    else:
        await pool.execute("UPDATE outbox_jobs SET locked_until = now() - interval '1 second'")
        await pool.fetch(sql.JOB_RESCUE_EXPIRED, 10)
    row = await pool.fetchrow("SELECT state, finished_at, locked_by FROM outbox_jobs")
    assert claimed["id"] == job_id
    assert row["state"] == "cancelled"
    assert row["finished_at"] is not None
    assert row["locked_by"] is None


async def test_retry_of_dead_jobs_forgets_an_old_cancel_request(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    job_id = await insert_job(pool, "echo", state="dead", attempts=1, max_attempts=1)
    await pool.execute("UPDATE outbox_jobs SET cancel_requested_at = now()")
    assert (await admin_client.post("/jobs/retry-dead", headers=AUTH)).json()["retried"] == [job_id]
    assert await pool.fetchval("SELECT cancel_requested_at FROM outbox_jobs") is None
