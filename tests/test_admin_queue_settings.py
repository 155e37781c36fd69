"""Queue settings through the admin JSON routes on the library's own host: the settings of
one queue read, limited, paused and resumed, each change in ``outbox_queues`` when answered
(whichever session dependency the app mounts the router with), ``GET /queues`` carrying them,
the token required, and every bad request a 4xx that changes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from tests.admin_host import SessionDependency, begun, create_admin_host, plain
from tests.admin_support import AUTH, TOKEN, insert_job, queue_settings_rows, refuse_commit_ddl

SETTINGS_KEYS = {
    "queue",
    "concurrency",
    "key_concurrency",
    "rate_limit",
    "rate_period",
    "key_rate_limit",
    "key_rate_period",
    "breaker_threshold",
    "paused",
    "paused_at",
    "paused_by",
    "pause_reason",
    "updated_at",
}

REFUSE_COMMIT_DDL = refuse_commit_ddl("outbox_queues")


async def row(pool: asyncpg.Pool, name: str) -> asyncpg.Record | None:
    found: asyncpg.Record | None = await pool.fetchrow(
        "SELECT concurrency, paused_at, paused_by, pause_reason FROM outbox_queues WHERE name = $1",
        name,
    )
    return found


def client_of(get_session: SessionDependency) -> httpx.AsyncClient:
    """The admin host on that session dependency, admin on; its 500s come back as answers."""
    host = create_admin_host(get_session, admin_token=TOKEN)
    transport = httpx.ASGITransport(app=host, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@pytest.mark.parametrize("dependency", [plain, begun], ids=["plain", "begun"])
async def test_each_change_is_in_the_table_when_answered(
    engine: AsyncEngine,
    pool: asyncpg.Pool,
    dependency: Callable[[AsyncEngine], SessionDependency],
) -> None:
    async with client_of(dependency(engine)) as client:
        response = await client.get("/queues/emails/settings", headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json() == {
            "queue": "emails",
            "concurrency": None,
            "key_concurrency": None,
            "rate_limit": None,
            "rate_period": 1.0,
            "key_rate_limit": None,
            "key_rate_period": 1.0,
            "breaker_threshold": None,
            "paused": False,
            "paused_at": None,
            "paused_by": None,
            "pause_reason": None,
            "updated_at": None,
        }
        assert response.headers["cache-control"] == "no-store"
        assert await row(pool, "emails") is None  # reading writes nothing

        response = await client.patch(
            "/queues/emails/settings", json={"concurrency": 3}, headers=AUTH
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["queue"], body["concurrency"], body["paused"]) == ("emails", 3, False)
        assert body["updated_at"] is not None
        assert (await row(pool, "emails") or {}).get("concurrency") == 3
        shown = (await client.get("/queues/emails/settings", headers=AUTH)).json()
        assert shown == body

        response = await client.post(
            "/queues/emails/pause", json={"reason": "provider outage"}, headers=AUTH
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["paused"], body["paused_by"], body["pause_reason"]) == (
            True,
            "operator",
            "provider outage",
        )
        assert body["concurrency"] == 3
        stored = await row(pool, "emails")
        assert stored is not None
        assert stored["paused_at"] is not None
        assert (stored["paused_by"], stored["pause_reason"]) == ("operator", "provider outage")
        assert body["paused_at"] == stored["paused_at"].isoformat()

        # Paused again, without a body: no reason now, and still paused since the first time.
        response = await client.post("/queues/emails/pause", headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["pause_reason"] is None
        again = await row(pool, "emails")
        assert again is not None
        assert again["paused_at"] == stored["paused_at"]
        assert again["pause_reason"] is None

        response = await client.post("/queues/emails/resume", headers=AUTH)
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["paused"], body["paused_at"], body["paused_by"]) == (False, None, None)
        assert body["concurrency"] == 3  # resuming keeps the limit
        assert dict(await row(pool, "emails") or {}) == {
            "concurrency": 3,
            "paused_at": None,
            "paused_by": None,
            "pause_reason": None,
        }

        response = await client.patch(
            "/queues/emails/settings", json={"concurrency": None}, headers=AUTH
        )
        assert response.status_code == 200, response.text
        assert response.json()["concurrency"] is None
        assert (await row(pool, "emails") or {"concurrency": "missing"})["concurrency"] is None

        # Resuming a queue that has no settings: the defaults, and no row made for it.
        response = await client.post("/queues/reports/resume", headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["paused"] is False
        assert await row(pool, "reports") is None


async def test_the_largest_limit_and_the_longest_reason_are_accepted(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    response = await admin_client.patch(
        "/queues/q/settings", json={"concurrency": 1_000_000}, headers=AUTH
    )
    assert response.status_code == 200, response.text
    response = await admin_client.post("/queues/q/pause", json={"reason": "r" * 500}, headers=AUTH)
    assert response.status_code == 200, response.text
    stored = await row(pool, "q")
    assert stored is not None
    assert (stored["concurrency"], stored["pause_reason"]) == (1_000_000, "r" * 500)


async def test_queues_carry_their_settings_and_queues_with_settings_alone_are_listed(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await insert_job(pool, "echo")  # queue "default": jobs, no settings
    await insert_job(pool, "echo", queue="emails")  # jobs and settings
    await pool.execute("INSERT INTO outbox_queues (name, concurrency) VALUES ('emails', 4)")
    await pool.execute(
        "INSERT INTO outbox_queues (name, paused_at, paused_by, pause_reason) "
        "VALUES ('archive', now(), 'breaker', 'too many failures')"
    )  # settings, no jobs
    body = (await admin_client.get("/queues", headers=AUTH)).json()
    assert [entry["queue"] for entry in body["queues"]] == ["archive", "default", "emails"]
    queues = {entry["queue"]: entry for entry in body["queues"]}
    for entry in queues.values():
        assert set(entry) == {
            "queue",
            "depth",
            "due",
            "oldest_due_seconds",
            "finished_recently",
            "settings",
        }
        assert set(entry["settings"]) == SETTINGS_KEYS
        assert entry["settings"]["queue"] == entry["queue"]

    assert queues["default"]["depth"]["queued"] == 1
    assert queues["default"]["settings"]["concurrency"] is None
    assert queues["default"]["settings"]["paused"] is False
    assert queues["emails"]["depth"]["queued"] == 1
    assert queues["emails"]["settings"]["concurrency"] == 4
    archive = queues["archive"]
    assert archive["depth"] == {
        "queued": 0,
        "running": 0,
        "succeeded": 0,
        "dead": 0,
        "cancelled": 0,
    }
    assert archive["finished_recently"] == {"succeeded": 0, "dead": 0, "cancelled": 0}
    assert (archive["due"], archive["oldest_due_seconds"]) == (0, 0.0)
    assert archive["settings"]["paused"] is True
    assert archive["settings"]["paused_by"] == "breaker"
    assert archive["settings"]["pause_reason"] == "too many failures"


ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/queues", None),
    ("GET", "/queues/emails/settings", None),
    ("PATCH", "/queues/emails/settings", {"concurrency": 1}),
    ("POST", "/queues/emails/pause", {"reason": "x"}),
    ("POST", "/queues/emails/resume", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_the_settings_routes_need_the_token(
    admin_app: FastAPI,
    admin_client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    await pool.execute(
        "INSERT INTO outbox_queues (name, paused_at, paused_by) VALUES ('emails', now(), 'x')"
    )
    before = await queue_settings_rows(pool)
    for headers in [{}, {"Authorization": "Bearer wrong-token-of-some-length"}]:
        response = await admin_client.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, response.text
        assert "token" in response.json()["detail"]
    assert await queue_settings_rows(pool) == before


async def test_the_settings_routes_are_refused_without_a_configured_token(
    admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    for method, path, body in ROUTES:
        response = await admin_client.request(method, path, json=body, headers=AUTH)
        assert response.status_code == 403, (path, response.text)
    assert await queue_settings_rows(pool) == []


@pytest.mark.parametrize(
    ("method", "path", "body", "fragment"),
    [
        ("PATCH", "/queues/emails/settings", {"concurrency": 0}, "greater than or equal to 1"),
        ("PATCH", "/queues/emails/settings", {"concurrency": -1}, "greater than or equal to 1"),
        ("PATCH", "/queues/emails/settings", {"concurrency": 1_000_001}, "less than or equal"),
        ("PATCH", "/queues/emails/settings", {"concurrency": "abc"}, "concurrency"),
        ("PATCH", "/queues/emails/settings", {"concurrency": "3"}, "concurrency"),
        ("PATCH", "/queues/emails/settings", {"concurrency": True}, "concurrency"),
        ("PATCH", "/queues/emails/settings", {"concurrency": 2.5}, "concurrency"),
        ("PATCH", "/queues/emails/settings", {"concurrency": 2.0}, "concurrency"),
        ("PATCH", "/queues/emails/settings", {"concurrency": [3]}, "concurrency"),
        ("PATCH", "/queues/emails/settings", {}, "concurrency, key_concurrency, rate_limit"),
        ("PATCH", "/queues/emails/settings", {"rate_period": 0}, "greater than 0"),
        ("PATCH", "/queues/emails/settings", {"rate_limit": 0}, "greater than or equal to 1"),
        ("PATCH", "/queues/emails/settings", {"key_rate_limit": 0}, "greater than or equal"),
        ("PATCH", "/queues/emails/settings", {"key_rate_period": 86401}, "less than or equal"),
        ("PATCH", "/queues/emails/settings", {"breaker_threshold": 0}, "greater than or equal"),
        ("PATCH", "/queues/emails/settings", {"breaker_threshold": "3"}, "breaker_threshold"),
        ("PATCH", "/queues/emails/settings", {"concurrency": 3, "paused": True}, "paused"),
        ("PATCH", "/queues/emails/settings", None, "body"),
        ("PATCH", "/queues/no%20such%3B%20queue/settings", {"concurrency": 3}, "queue names"),
        ("PATCH", "/queues/1st/settings", {"concurrency": 3}, "queue names"),
        ("PATCH", f"/queues/{'q' * 129}/settings", {"concurrency": 3}, "queue names"),
        ("GET", "/queues/no%20such%3B%20queue/settings", None, "queue names"),
        ("POST", "/queues/emails/pause", {"reason": 5}, "reason"),
        ("POST", "/queues/emails/pause", {"reason": "r" * 501}, "reason"),
        ("POST", "/queues/emails/pause", {"reason": "r", "by": "breaker"}, "by"),
        ("POST", "/queues/emails/pause", {"paused_by": "breaker"}, "paused_by"),
        ("POST", "/queues/emails/pause", ["provider outage"], "body"),
        ("POST", "/queues/no%20such%3B%20queue/pause", None, "queue names"),
        ("POST", "/queues/1st/resume", None, "queue names"),
    ],
)
async def test_bad_requests_are_422_and_change_nothing(
    admin_app: FastAPI,
    admin_client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    method: str,
    path: str,
    body: Any,
    fragment: str,
) -> None:
    await pool.execute("INSERT INTO outbox_queues (name, concurrency) VALUES ('emails', 2)")
    before = await queue_settings_rows(pool)
    response = await admin_client.request(method, path, json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert fragment in str(response.json()["detail"])
    assert response.headers["cache-control"] == "no-store"
    assert await queue_settings_rows(pool) == before


async def test_a_body_that_is_not_json_is_422_and_changes_nothing(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await pool.execute("INSERT INTO outbox_queues (name, concurrency) VALUES ('emails', 2)")
    before = await queue_settings_rows(pool)
    for method, path in [("PATCH", "/queues/emails/settings"), ("POST", "/queues/emails/pause")]:
        response = await admin_client.request(
            method,
            path,
            content=b"concurrency=abc",
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert response.status_code == 422, response.text
        assert response.json()["detail"]
    assert await queue_settings_rows(pool) == before


@pytest.mark.parametrize("opens_transaction", [False, True], ids=["plain", "begun"])
async def test_a_refused_commit_is_a_500_that_says_so_and_changes_nothing(
    engine: AsyncEngine, pool: asyncpg.Pool, opens_transaction: bool
) -> None:
    await pool.execute(REFUSE_COMMIT_DDL)
    await pool.execute("INSERT INTO outbox_queues (name, concurrency) VALUES ('emails', 2)")
    before = await queue_settings_rows(pool)
    refuse = text("SELECT set_config('pgoutbox_test.refuse_commit', 'on', true)")

    async def refusing() -> AsyncIterator[AsyncSession]:
        async with AsyncSession(engine) as session:
            if opens_transaction:
                async with session.begin():
                    await session.execute(refuse)
                    yield session
            else:
                await session.execute(refuse)
                yield session

    async with client_of(refusing) as client:
        for method, path, body, verb in [
            (
                "PATCH",
                "/queues/emails/settings",
                {"concurrency": 5},
                "the settings of queue emails",
            ),
            ("POST", "/queues/emails/pause", None, "queue emails was not paused"),
            ("POST", "/queues/emails/resume", None, "queue emails was not resumed"),
        ]:
            response = await client.request(method, path, json=body, headers=AUTH)
            assert response.status_code == 500, response.text
            detail = response.json()["detail"]
            assert verb in detail
            assert "the test refuses this commit" in detail
    assert await queue_settings_rows(pool) == before


async def test_a_patch_changes_only_the_fields_it_gives(
    pool: asyncpg.Pool, engine: AsyncEngine
) -> None:
    async with client_of(plain(engine)) as client:
        first = await client.patch("/queues/emails/settings", json={"concurrency": 4}, headers=AUTH)
        assert first.status_code == 200, first.text
        second = await client.patch(
            "/queues/emails/settings",
            json={"breaker_threshold": 10, "key_concurrency": 2, "rate_limit": 7},
            headers=AUTH,
        )
        assert second.status_code == 200, second.text
        body = second.json()
        assert (body["concurrency"], body["key_concurrency"], body["breaker_threshold"]) == (
            4,
            2,
            10,
        )
    stored = await pool.fetchrow(
        "SELECT concurrency, key_concurrency, breaker_threshold, rate_limit, rate_period "
        "FROM outbox_queues WHERE name = 'emails'"
    )
    assert stored is not None
    assert tuple(stored) == (4, 2, 10, 7, 1.0)


async def test_a_rate_per_key_keeps_its_window_when_only_the_limit_changes(
    pool: asyncpg.Pool, engine: AsyncEngine
) -> None:
    async with client_of(plain(engine)) as client:
        first = await client.patch(
            "/queues/emails/settings",
            json={"key_rate_limit": 3, "key_rate_period": 60},
            headers=AUTH,
        )
        assert first.status_code == 200, first.text
        second = await client.patch(
            "/queues/emails/settings", json={"key_rate_limit": 5}, headers=AUTH
        )
        assert second.status_code == 200, second.text
        assert (second.json()["key_rate_limit"], second.json()["key_rate_period"]) == (5, 60.0)
    stored = await pool.fetchrow(
        "SELECT key_rate_limit, key_rate_period, rate_limit FROM outbox_queues "
        "WHERE name = 'emails'"
    )
    assert stored is not None
    assert tuple(stored) == (5, 60.0, None)
