"""The sample service's sign-up route (POST /signup), through the ASGI app on real
PostgreSQL, with real ``outbox-worker run --burst`` processes running the welcome e-mail job
it enqueues: one user and one job per address, and one e-mail per user."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest

from tests.sample.support import (
    SpawnWorker,
    assert_json_detail,
    job_row,
    run_burst_worker,
    sign_up,
    table_counts,
)


async def test_signup_creates_user_and_job_then_a_worker_sends_one_email(
    client: httpx.AsyncClient, pool: asyncpg.Pool, spawn_worker: SpawnWorker
) -> None:
    response = await client.post("/signup", json={"email": "Ada@Example.com", "name": "Ada"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"user_id", "email", "job_id"}
    assert body["email"] == "ada@example.com"
    user_id, job_id = body["user_id"], body["job_id"]

    user = await pool.fetchrow("SELECT email, name FROM users WHERE id = $1", user_id)
    assert user is not None
    assert (user["email"], user["name"]) == ("ada@example.com", "Ada")
    job = await job_row(pool, job_id)
    assert job["task"] == "send_welcome_email"
    assert job["queue"] == "emails"
    assert job["args"] == {"user_id": user_id}
    assert job["max_attempts"] == 8
    assert job["dedupe_key"] == f"welcome:{user_id}"
    # Answered before any e-mail went out: the job waits for a worker.
    assert job["state"] == "queued"
    assert job["attempts"] == 0
    assert await pool.fetchval("SELECT count(*) FROM sent_emails") == 0

    await run_burst_worker(spawn_worker)

    job = await job_row(pool, job_id)
    assert job["state"] == "succeeded"
    assert job["attempts"] == 1
    emails = await pool.fetch("SELECT job_id, user_id, to_address, subject, body FROM sent_emails")
    assert len(emails) == 1
    email = emails[0]
    assert (email["job_id"], email["user_id"], email["to_address"]) == (
        job_id,
        user_id,
        "ada@example.com",
    )
    assert email["subject"] == "Welcome to pgoutbox"
    assert email["body"].startswith("Hello Ada,")


async def test_signup_without_a_name_greets_plainly(
    client: httpx.AsyncClient, pool: asyncpg.Pool, spawn_worker: SpawnWorker
) -> None:
    user_id = await sign_up(client, "noname@example.com")
    await run_burst_worker(spawn_worker)
    body = await pool.fetchval("SELECT body FROM sent_emails WHERE user_id = $1", user_id)
    assert body is not None
    assert body.startswith("Hello,\n")


async def test_a_rerun_welcome_job_does_not_send_a_second_email(
    client: httpx.AsyncClient, pool: asyncpg.Pool, spawn_worker: SpawnWorker
) -> None:
    response = await client.post("/signup", json={"email": "once@example.com"})
    assert response.status_code == 201, response.text
    user_id, job_id = response.json()["user_id"], response.json()["job_id"]

    await run_burst_worker(spawn_worker)
    # A second worker finds nothing to do.
    await run_burst_worker(spawn_worker)
    assert await pool.fetchval("SELECT count(*) FROM sent_emails WHERE user_id = $1", user_id) == 1

    # An operator (or a lost lease) makes the same job run again.
    await pool.execute(
        "UPDATE outbox_jobs SET state = 'queued', run_at = now(), finished_at = NULL WHERE id = $1",
        job_id,
    )
    await run_burst_worker(spawn_worker)

    job = await job_row(pool, job_id)
    assert job["state"] == "succeeded"
    assert job["attempts"] == 2, "the job really ran a second time"
    rows = await pool.fetch("SELECT job_id FROM sent_emails WHERE user_id = $1", user_id)
    assert [r["job_id"] for r in rows] == [job_id]


@pytest.mark.parametrize("second", ["taken@example.com", "TAKEN@EXAMPLE.COM", "Taken@example.com"])
async def test_a_taken_email_is_409_and_creates_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool, second: str
) -> None:
    first = await client.post("/signup", json={"email": "taken@example.com", "name": "First"})
    assert first.status_code == 201, first.text
    before = await table_counts(pool)

    response = await client.post("/signup", json={"email": second, "name": "Second"})

    assert response.status_code == 409, response.text
    detail = assert_json_detail(response)
    assert isinstance(detail, str)
    assert "registered" in detail
    assert "x-request-id" in response.headers
    assert await table_counts(pool) == before
    assert await pool.fetchval("SELECT name FROM users") == "First"
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 1


async def test_concurrent_signups_with_one_email_create_one_user_and_one_job(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    emails = ["race@example.com" if i % 2 else "RACE@example.com" for i in range(10)]
    responses = await asyncio.gather(
        *(client.post("/signup", json={"email": email}) for email in emails)
    )
    codes = sorted(r.status_code for r in responses)
    assert codes == [201] + [409] * 9, [r.text for r in responses]
    assert await pool.fetchval("SELECT count(*) FROM users") == 1
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 1
