"""Admin changes answered as done are committed: the JSON routes' 2xx and the dashboard's
success flash each mean the row changed, whichever session dependency the app mounts the
router with; a change the database refuses to commit is a 5xx that says so, and changes
nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from outbox_worker.web.auth import COOKIE, cookie_value
from outbox_worker.web.dashboard import FLASH_COOKIE, decode_flash
from tests.admin_host import SessionDependency, begun, create_admin_host, plain
from tests.admin_support import refuse_commit_ddl

TOKEN = "commit-test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HOST = "http://testserver"
SIGNED_IN = {"Cookie": f"{COOKIE}={cookie_value(TOKEN)}", "Origin": HOST}

REFUSE_COMMIT_DDL = refuse_commit_ddl("outbox_jobs", "outbox_revoked_sessions")
REFUSE = text("SELECT set_config('pgoutbox_test.refuse_commit', 'on', true)")


def refusing(engine: AsyncEngine, *, opens_transaction: bool) -> SessionDependency:
    """A session whose commit the database refuses, once anything was written."""

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with AsyncSession(engine) as session:
            if opens_transaction:
                async with session.begin():
                    await session.execute(REFUSE)
                    yield session
            else:
                await session.execute(REFUSE)
                yield session

    return get_session


COMMITTING = {"plain": plain, "begun": begun}


@pytest.fixture
async def refuse_commits(pool: asyncpg.Pool) -> None:
    await pool.execute(REFUSE_COMMIT_DDL)


async def mounted(get_session: SessionDependency) -> httpx.AsyncClient:
    """The admin host on that dependency, admin on; its 500s come back as answers."""
    host = create_admin_host(get_session, admin_token=TOKEN)
    transport = httpx.ASGITransport(app=host, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url=HOST)


async def insert_job(pool: asyncpg.Pool, state: str = "queued") -> int:
    """A job in that state, as far as the table's constraints let it be."""
    attempts, finished, locked = {
        "queued": (0, "NULL", "NULL"),
        "running": (1, "NULL", "'some-worker'"),
    }.get(state, (1, "now()", "NULL"))
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, state, attempts, max_attempts, last_error, finished_at, "
        "locked_by, locked_until) "
        f"VALUES ('echo', $1, $2, 3, 'boom', {finished}, {locked}, "
        f"CASE WHEN {locked} IS NULL THEN NULL ELSE now() + interval '1 hour' END) RETURNING id",
        state,
        attempts,
    )
    return job_id


async def state_of(pool: asyncpg.Pool, job_id: int) -> str:
    state: str = await pool.fetchval("SELECT state FROM outbox_jobs WHERE id = $1", job_id)
    return state


# ---------------------------------------------------------------------------------------------
# JSON routes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dependency", sorted(COMMITTING))
async def test_a_2xx_from_cancel_retry_and_retry_dead_means_the_rows_changed(
    engine: AsyncEngine, pool: asyncpg.Pool, dependency: str
) -> None:
    queued = await insert_job(pool, "queued")
    dead = await insert_job(pool, "dead")
    also_dead = [await insert_job(pool, "dead") for _ in range(2)]
    async with await mounted(COMMITTING[dependency](engine)) as client:
        response = await client.post(f"/jobs/{queued}/cancel", headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "cancelled"
        assert await state_of(pool, queued) == "cancelled"

        response = await client.post(f"/jobs/{dead}/retry", headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "queued"
        assert await state_of(pool, dead) == "queued"

        response = await client.post("/jobs/retry-dead", headers=AUTH)
        assert response.status_code == 200, response.text
        assert sorted(response.json()["retried"]) == also_dead
        assert [await state_of(pool, job_id) for job_id in also_dead] == ["queued", "queued"]


async def test_a_cancel_of_a_running_job_is_committed_before_it_is_answered(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    job_id = await insert_job(pool, "running")
    async with await mounted(plain(engine)) as client:
        response = await client.post(f"/jobs/{job_id}/cancel", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["cancel_requested_at"] is not None
    requested = await pool.fetchval(
        "SELECT cancel_requested_at IS NOT NULL FROM outbox_jobs WHERE id = $1", job_id
    )
    assert requested


@pytest.mark.parametrize("opens_transaction", [False, True], ids=["plain", "begun"])
@pytest.mark.usefixtures("refuse_commits")
async def test_a_refused_commit_is_a_500_that_says_so_and_changes_nothing(
    engine: AsyncEngine, pool: asyncpg.Pool, opens_transaction: bool
) -> None:
    queued = await insert_job(pool, "queued")
    dead = await insert_job(pool, "dead")
    async with await mounted(refusing(engine, opens_transaction=opens_transaction)) as client:
        for path, job_id, verb in [
            (f"/jobs/{queued}/cancel", queued, "cancelled"),
            (f"/jobs/{dead}/retry", dead, "retried"),
        ]:
            response = await client.post(path, headers=AUTH)
            assert response.status_code == 500, response.text
            detail = response.json()["detail"]
            assert f"job {job_id} was not {verb}" in detail
            assert "the test refuses this commit" in detail
            assert response.headers["cache-control"] == "no-store"
        response = await client.post("/jobs/retry-dead", headers=AUTH)
        assert response.status_code == 500, response.text
        assert "dead jobs were not retried" in response.json()["detail"]
    assert await state_of(pool, queued) == "queued"
    assert await state_of(pool, dead) == "dead"


async def each_change_commits_once(
    client: httpx.AsyncClient, pool: asyncpg.Pool, commits: list[object]
) -> None:
    """Every change through the JSON routes and the dashboard's forms, signed in with TOKEN,
    each adds exactly one to ``commits`` (the engine's commit events) and changes its row."""
    queued = await insert_job(pool, "queued")
    dead = await insert_job(pool, "dead")
    other_dead = await insert_job(pool, "dead")
    dashboard_dead = await insert_job(pool, "dead")

    for path, job_id, state in [
        (f"/jobs/{queued}/cancel", queued, "cancelled"),
        (f"/jobs/{dead}/retry", dead, "queued"),
        ("/jobs/retry-dead", other_dead, "queued"),
    ]:
        before = len(commits)
        response = await client.post(path, headers=AUTH)
        assert response.status_code == 200, response.text
        assert len(commits) == before + 1, path
        assert await state_of(pool, job_id) == state

    before = len(commits)
    response = await client.post(f"/dashboard/jobs/{dashboard_dead}/retry", headers=SIGNED_IN)
    assert response.status_code == 303, response.text
    assert len(commits) == before + 1
    assert await state_of(pool, dashboard_dead) == "queued"
    before = len(commits)
    response = await client.post(f"/dashboard/jobs/{dashboard_dead}/cancel", headers=SIGNED_IN)
    assert response.status_code == 303, response.text
    assert len(commits) == before + 1
    assert await state_of(pool, dashboard_dead) == "cancelled"


@pytest.mark.parametrize("dependency", sorted(COMMITTING))
async def test_each_change_commits_once_whoever_opened_the_transaction(
    engine: AsyncEngine, pool: asyncpg.Pool, dependency: str
) -> None:
    """When the dependency opens the transaction (session.begin()) and commits it on the way
    out, the route's own commit must not make that a second one, nor an error; when it opens
    none, the route's commit is the one."""
    commits: list[object] = []
    event.listen(engine.sync_engine, "commit", commits.append)
    async with await mounted(COMMITTING[dependency](engine)) as client:
        await each_change_commits_once(client, pool, commits)


# ---------------------------------------------------------------------------------------------
# Dashboard forms
# ---------------------------------------------------------------------------------------------


def flash(response: httpx.Response) -> Any:
    value = response.cookies.get(FLASH_COOKIE)
    return None if value is None else decode_flash(value)


@pytest.mark.parametrize("dependency", sorted(COMMITTING))
async def test_a_dashboard_flash_that_says_done_means_the_row_changed(
    engine: AsyncEngine, pool: asyncpg.Pool, dependency: str
) -> None:
    job_id = await insert_job(pool, "dead")
    async with await mounted(COMMITTING[dependency](engine)) as client:
        response = await client.post(f"/dashboard/jobs/{job_id}/retry", headers=SIGNED_IN)
        assert response.status_code == 303, response.text
        assert flash(response).kind == "ok"
        assert await state_of(pool, job_id) == "queued"

        response = await client.post(f"/dashboard/jobs/{job_id}/cancel", headers=SIGNED_IN)
        assert response.status_code == 303, response.text
        assert flash(response).kind == "ok"
        assert await state_of(pool, job_id) == "cancelled"


@pytest.mark.parametrize("opens_transaction", [False, True], ids=["plain", "begun"])
@pytest.mark.usefixtures("refuse_commits")
async def test_a_dashboard_change_the_database_refuses_is_a_500_page_without_a_flash(
    engine: AsyncEngine, pool: asyncpg.Pool, opens_transaction: bool
) -> None:
    dead = await insert_job(pool, "dead")
    queued = await insert_job(pool, "queued")
    async with await mounted(refusing(engine, opens_transaction=opens_transaction)) as client:
        for action, job_id, verb in [("retry", dead, "retried"), ("cancel", queued, "cancelled")]:
            response = await client.post(f"/dashboard/jobs/{job_id}/{action}", headers=SIGNED_IN)
            assert response.status_code == 500, response.text
            assert flash(response) is None
            assert f"Job {job_id} was not {verb}" in response.text
            assert "the test refuses this commit" in response.text
    assert await state_of(pool, dead) == "dead"
    assert await state_of(pool, queued) == "queued"


async def revoked(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM outbox_revoked_sessions")
    return count


async def test_signing_out_with_a_plain_session_dependency_ends_the_session(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    async with await mounted(plain(engine)) as client:
        response = await client.post("/dashboard/logout", headers=SIGNED_IN)
        assert response.status_code == 303, response.text
        assert await revoked(pool) == 1
        response = await client.get("/dashboard", headers=SIGNED_IN)
        assert response.status_code == 303
        assert response.headers["location"].startswith("/dashboard/login")


@pytest.mark.usefixtures("refuse_commits")
async def test_a_sign_out_the_database_refuses_is_a_500_and_keeps_the_cookie(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    async with await mounted(refusing(engine, opens_transaction=False)) as client:
        response = await client.post("/dashboard/logout", headers=SIGNED_IN)
    assert response.status_code == 500, response.text
    assert "Not signed out" in response.text
    assert COOKIE not in response.headers.get("set-cookie", "")
    assert flash(response) is None
    assert await revoked(pool) == 0
