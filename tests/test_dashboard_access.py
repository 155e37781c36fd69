"""The dashboard's refusals through the library's admin host in process (``admin_host``, an
app of ``outbox_worker.web`` alone): no configured token, posts from another site, pages
without a session sent to the login form, and the login form never sending anyone off the
dashboard. The browser's view of them is in tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from outbox_worker.web.auth import COOKIE, cookie_value, read_session
from tests.dashboard_support import HOST, SIGNED_IN, TOKEN, insert_dead, job_state


async def test_no_configured_token_refuses_every_page_and_the_login(
    admin_client: httpx.AsyncClient,
) -> None:
    for method, path in [
        ("GET", "/dashboard"),
        ("GET", "/dashboard/jobs"),
        ("GET", "/dashboard/jobs/1"),
        ("GET", "/dashboard/login"),
        ("POST", "/dashboard/jobs/1/retry"),
        ("POST", "/dashboard/jobs/1/cancel"),
    ]:
        response = await admin_client.request(method, path, headers={**SIGNED_IN, "Origin": HOST})
        assert response.status_code == 403, (path, response.text)
        assert "Admin is disabled" in response.text
    response = await admin_client.post(
        "/dashboard/login", data={"token": TOKEN}, headers={"Origin": HOST}
    )
    assert response.status_code == 403
    assert "Admin is disabled" in response.text
    assert COOKIE not in response.cookies


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://testserver.evil.example"},
        {"Referer": "http://evil.example/dashboard/jobs/1"},
        {"Origin": "http://evil.example", "Referer": f"{HOST}/dashboard"},
    ],
)
async def test_a_post_without_a_same_host_origin_is_refused(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool, headers: dict[str, str]
) -> None:
    job_id = await insert_dead(pool)
    for action in ("retry", "cancel"):
        response = await admin_client.post(
            f"/dashboard/jobs/{job_id}/{action}", headers={**SIGNED_IN, **headers}
        )
        assert response.status_code == 403, response.text
        assert "Request refused" in response.text
    assert await job_state(pool, job_id) == "dead"
    response = await admin_client.post("/dashboard/login", data={"token": TOKEN}, headers=headers)
    assert response.status_code == 403
    assert COOKIE not in response.cookies
    response = await admin_client.post("/dashboard/logout", headers={**SIGNED_IN, **headers})
    assert response.status_code == 403


@pytest.mark.parametrize("headers", [{"Origin": HOST}, {"Referer": f"{HOST}/dashboard/jobs/1"}])
async def test_a_same_host_post_acts_and_flashes(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool, headers: dict[str, str]
) -> None:
    job_id = await insert_dead(pool)
    response = await admin_client.post(
        f"/dashboard/jobs/{job_id}/retry", headers={**SIGNED_IN, **headers}
    )
    assert response.status_code == 303
    assert response.headers["location"] == f"/dashboard/jobs/{job_id}"
    assert await job_state(pool, job_id) == "queued"
    flash = response.cookies["outbox_flash"]
    page = await admin_client.get(
        response.headers["location"],
        headers={"Cookie": f"{SIGNED_IN['Cookie']}; outbox_flash={flash}"},
    )
    assert page.status_code == 200
    assert f"Job {job_id} is queued again" in page.text
    assert "max-age=0" in page.headers["set-cookie"].lower()  # shown once

    response = await admin_client.post(
        f"/dashboard/jobs/{job_id}/cancel", headers={**SIGNED_IN, **headers}
    )
    assert response.status_code == 303
    assert await job_state(pool, job_id) == "cancelled"
    # Cancelling a finished job is refused with the reason (a flash), not a 500.
    response = await admin_client.post(
        f"/dashboard/jobs/{job_id}/cancel", headers={**SIGNED_IN, **headers}
    )
    assert response.status_code == 303
    page = await admin_client.get(
        response.headers["location"],
        headers={
            "Cookie": f"{SIGNED_IN['Cookie']}; outbox_flash={response.cookies['outbox_flash']}"
        },
    )
    assert f"Not cancelled: job {job_id} is already cancelled" in page.text


async def test_unauthenticated_pages_redirect_and_posts_do_not_act(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    job_id = await insert_dead(pool)
    for path in ("/dashboard", "/dashboard/jobs?queue=default", f"/dashboard/jobs/{job_id}"):
        response = await admin_client.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/dashboard/login?next=%2Fdashboard")
    wrong = {"Cookie": f"{COOKIE}={cookie_value('some-other-token-entirely')}"}
    response = await admin_client.get("/dashboard", headers=wrong)
    assert response.status_code == 303
    response = await admin_client.post(
        f"/dashboard/jobs/{job_id}/retry", headers={**wrong, "Origin": HOST}
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard/login?next=%2Fdashboard"
    assert await job_state(pool, job_id) == "dead"
    # The bearer token works too (scripts), as for the JSON routes.
    response = await admin_client.get("/dashboard", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "target",
    ["https://evil.example/", "//evil.example/dashboard", "/dashboard\\..\\x", "/other", ""],
)
async def test_login_never_redirects_off_the_dashboard(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, target: str
) -> None:
    response = await admin_client.post(
        "/dashboard/login", data={"token": TOKEN, "next": target}, headers={"Origin": HOST}
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard"
    assert read_session(TOKEN, response.cookies[COOKIE]) is not None
