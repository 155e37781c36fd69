"""The sample service's welcome e-mail tested with outbox_worker.testing, as an app's own
test suite would test it: docs/testing.md's examples, run. The helpers themselves are tested
in tests/test_testing_*.py."""

from __future__ import annotations

import asyncpg
import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.tasks import registry
from outbox_worker.testing import DrainResult, assert_enqueued, drain, perform_job


async def test_signup_answers_before_the_welcome_email_and_a_drain_sends_it_once(
    client: httpx.AsyncClient, engine: AsyncEngine, database_url: str
) -> None:
    """The story of docs/testing.md: answered first, the e-mail sent once by a drain."""
    response = await client.post("/signup", json={"email": "Ada@Example.com", "name": "Ada"})
    assert response.status_code == 201, response.text
    user_id, job_id = response.json()["user_id"], response.json()["job_id"]

    sent = text("SELECT job_id, user_id, to_address FROM sent_emails")
    async with AsyncSession(engine) as session:
        assert (await session.execute(sent)).all() == []  # answered, not sent yet
        [job] = await assert_enqueued(
            session,
            "send_welcome_email",
            {"user_id": user_id},
            state="queued",
            queue="emails",
            key=f"welcome:{user_id}",
        )
    assert job.id == job_id

    first = await drain(registry, database_url)
    assert first == DrainResult(succeeded=1, job_ids=(job_id,))
    async with AsyncSession(engine) as session:
        assert (await session.execute(sent)).all() == [(job_id, user_id, "ada@example.com")]
        [done] = await assert_enqueued(session, "send_welcome_email", state="succeeded", count=1)
    assert done.result == {"sent": True, "to": "ada@example.com"}

    assert await drain(registry, database_url) == DrainResult()
    async with AsyncSession(engine) as session:
        assert len((await session.execute(sent)).all()) == 1


async def test_perform_job_runs_the_sample_apps_welcome_email_in_the_tests_transaction(
    pool: asyncpg.Pool,
) -> None:
    """The example of docs/testing.md's perform_job."""
    user_id = await pool.fetchval(
        "INSERT INTO users (email, name) VALUES ('bo@example.com', 'Bo') RETURNING id"
    )
    async with pool.acquire() as conn:
        outer = conn.transaction()
        await outer.start()
        sent = await perform_job(
            registry, "send_welcome_email", {"user_id": user_id}, database=conn, job_id=41
        )
        assert sent == {"sent": True, "to": "bo@example.com"}
        assert "Hello Bo," in await conn.fetchval("SELECT body FROM sent_emails")
        assert await conn.fetchval("SELECT job_id FROM sent_emails") == 41
        await outer.rollback()
    assert await pool.fetchval("SELECT count(*) FROM sent_emails") == 0
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 0
