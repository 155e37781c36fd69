"""The admin service through its HTTP face, the JSON routes of
``outbox_worker.web.create_admin_router`` on the library's own host (``admin_host``): the
token. None configured is 403, a missing or wrong one 401, and the dashboard's cookie does not
stand in for the bearer token. The sample service's health, metrics and backpressure answers
are in tests/sample/."""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from outbox_worker.web.auth import COOKIE, cookie_value
from tests.admin_support import AUTH, TOKEN, insert_job


async def test_admin_routes_are_refused_without_a_configured_token(
    admin_client: httpx.AsyncClient,
) -> None:
    for method, path in [
        ("GET", "/jobs"),
        ("GET", "/jobs/1"),
        ("POST", "/jobs/1/retry"),
        ("POST", "/jobs/1/cancel"),
        ("GET", "/queues"),
    ]:
        response = await admin_client.request(method, path, headers=AUTH)
        assert response.status_code == 403, (path, response.text)
        assert "OUTBOX_ADMIN_TOKEN" in response.json()["detail"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-of-some-length"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
)
async def test_a_missing_or_wrong_token_is_401(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await admin_client.get("/jobs", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "token" in response.json()["detail"]


async def test_json_routes_take_the_bearer_token_not_the_dashboard_cookie(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    job_id = await insert_job(pool, "echo")
    admin_client.cookies.set(COOKIE, cookie_value(TOKEN))
    response = await admin_client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 401
    assert await pool.fetchval("SELECT state FROM outbox_jobs WHERE id = $1", job_id) == "queued"
