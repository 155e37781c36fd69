"""The dashboard's sessions through the library's admin host in process (``admin_host``):
their age, signing out, wrong tokens, hostile cookies.
"""

from __future__ import annotations

import base64
import time

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from itsdangerous import TimestampSigner
from sqlalchemy.ext.asyncio import create_async_engine

from outbox_worker import sqlalchemy_url
from outbox_worker.web.auth import COOKIE, SESSION_MAX_AGE, cookie_value
from tests.admin_host import begun, create_admin_host
from tests.dashboard_support import HOST, TOKEN, insert_dead, job_state


def cookie_header(**cookies: str) -> dict[str, str]:
    return {"Cookie": "; ".join(f"{name}={value}" for name, value in cookies.items())}


def session_signed(monkeypatch: pytest.MonkeyPatch, seconds_ago: int) -> str:
    """A session cookie for TOKEN as if signed in ``seconds_ago`` seconds ago."""
    signed_at = int(time.time()) - seconds_ago
    with monkeypatch.context() as patch:
        patch.setattr(TimestampSigner, "get_timestamp", lambda _: signed_at)
        return cookie_value(TOKEN)


async def sign_in_with_the_form(client: httpx.AsyncClient) -> str:
    """The cookie a browser gets from the login form (kept out of the client's own jar)."""
    response = await client.post(
        "/dashboard/login", data={"token": TOKEN}, headers={"Origin": HOST}
    )
    assert response.status_code == 303, response.text
    client.cookies.clear()
    return response.cookies[COOKIE]


def assert_sent_to_login(response: httpx.Response) -> None:
    assert response.status_code == 303, response.text
    assert response.headers["location"].startswith("/dashboard/login")
    assert f'{COOKIE}=""' in response.headers["set-cookie"]  # the dead cookie is dropped
    assert "max-age=0" in response.headers["set-cookie"].lower()


@pytest.mark.parametrize(
    ("seconds_ago", "valid"),
    [
        (SESSION_MAX_AGE - 60, True),
        (SESSION_MAX_AGE + 1, False),
        (30 * 86400, False),
        (-3600, False),  # signed in the future: not by this server's clock
    ],
)
async def test_a_session_lasts_twelve_hours_from_sign_in(
    admin_app: FastAPI,
    admin_client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    seconds_ago: int,
    valid: bool,
) -> None:
    cookie = session_signed(monkeypatch, seconds_ago)
    response = await admin_client.get("/dashboard", headers=cookie_header(outbox_admin=cookie))
    if valid:
        assert response.status_code == 200, response.text
    else:
        assert_sent_to_login(response)


async def test_signing_out_ends_the_session_for_every_copy_of_its_cookie(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool, database_url: str
) -> None:
    copied = await sign_in_with_the_form(admin_client)
    elsewhere = await sign_in_with_the_form(admin_client)  # another browser, signed in on its own
    job_id = await insert_dead(pool)

    response = await admin_client.post(
        "/dashboard/logout", headers={**cookie_header(outbox_admin=copied), "Origin": HOST}
    )
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/dashboard/login"
    assert "max-age=0" in response.headers["set-cookie"].lower()

    # A copy of the cookie, sent after the sign-out, is a stranger's: to the login form.
    assert_sent_to_login(
        await admin_client.get("/dashboard", headers=cookie_header(outbox_admin=copied))
    )
    response = await admin_client.post(
        f"/dashboard/jobs/{job_id}/retry",
        headers={**cookie_header(outbox_admin=copied), "Origin": HOST},
    )
    assert_sent_to_login(response)
    assert await job_state(pool, job_id) == "dead"
    # The same in another process of the app: an app and engine of its own, same database.
    other_engine = create_async_engine(sqlalchemy_url(database_url))
    other = create_admin_host(begun(other_engine), admin_token=TOKEN)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=other), base_url=HOST
        ) as peer:
            assert_sent_to_login(
                await peer.get("/dashboard", headers=cookie_header(outbox_admin=copied))
            )
            response = await peer.get("/dashboard", headers=cookie_header(outbox_admin=elsewhere))
            assert response.status_code == 200
    finally:
        await other_engine.dispose()
    # Only that session ended.
    response = await admin_client.get("/dashboard", headers=cookie_header(outbox_admin=elsewhere))
    assert response.status_code == 200


# Ids fixed by hand: a session cookie differs at every collection, and pytest-xdist needs
# every worker to collect the same test ids.
NOT_SESSIONS = [
    pytest.param("", id="empty"),
    pytest.param("x", id="one-character"),
    pytest.param("a.b.c", id="three-parts"),
    pytest.param("....", id="dots"),
    pytest.param(cookie_value("another-token-entirely-0123456789"), id="another-tokens-session"),
    pytest.param("A" * 20_000, id="huge"),
    pytest.param("%00%ff%fe", id="escaped-bytes"),
]


@pytest.mark.parametrize("value", NOT_SESSIONS)
async def test_a_cookie_that_is_no_session_goes_to_the_login_form(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, value: str
) -> None:
    response = await admin_client.get("/dashboard", headers=cookie_header(outbox_admin=value))
    assert response.status_code == 303, response.text
    assert response.headers["location"].startswith("/dashboard/login")


def client_at(app: FastAPI, address: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url=HOST)


async def test_wrong_tokens_at_the_login_form_are_capped_per_address(admin_app: FastAPI) -> None:
    async with client_at(admin_app, "203.0.113.7") as guesser:
        for n in range(5):
            response = await guesser.post(
                "/dashboard/login", data={"token": f"guess-{n}"}, headers={"Origin": HOST}
            )
            assert response.status_code == 401, response.text
        for token in ("guess-6", TOKEN):  # past the cap, even the right token is refused
            response = await guesser.post(
                "/dashboard/login", data={"token": token}, headers={"Origin": HOST}
            )
            assert response.status_code == 429, response.text
            assert 1 <= int(response.headers["retry-after"]) <= 60
            assert "Too many wrong admin tokens" in response.text
            assert COOKIE not in response.cookies
    async with client_at(admin_app, "203.0.113.8") as neighbour:
        response = await neighbour.post(
            "/dashboard/login", data={"token": TOKEN}, headers={"Origin": HOST}
        )
        assert response.status_code == 303, response.text
        assert COOKIE in response.cookies


async def test_wrong_bearer_tokens_are_capped_per_address(admin_app: FastAPI) -> None:
    async with client_at(admin_app, "203.0.113.9") as guesser:
        for n in range(5):
            response = await guesser.get("/jobs", headers={"Authorization": f"Bearer guess-{n}"})
            assert response.status_code == 401, response.text
        response = await guesser.get("/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 429, response.text
        assert "Too many wrong admin tokens" in response.json()["detail"]
        assert 1 <= int(response.headers["retry-after"]) <= 60
    async with client_at(admin_app, "203.0.113.10") as neighbour:
        response = await neighbour.get("/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200, response.text


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


HOSTILE_FLASHES = [
    pytest.param(b64(b"[" * 1400 + b"]" * 1400), id="nested-list"),
    pytest.param(
        b64(b'{"kind": "ok", "text": ' + b"[" * 1300 + b"]" * 1300 + b"}"), id="nested-text"
    ),
    pytest.param(b64(b'{"kind": "ok", "text": "\\ud800"}'), id="lone-surrogate"),
    pytest.param(b64(b"\xff\xfe\x00\x81"), id="not-utf-8"),
    pytest.param(b64(b'{"kind": "<b>", "text": "x"}'), id="unknown-kind"),
    pytest.param(b64(b'"only a string"'), id="string"),
    pytest.param("not base64 at all!", id="not-base64"),
    pytest.param(b64(b'{"kind": "ok", "text": "' + b"x" * 60_000 + b'"}'), id="huge"),
]


@pytest.mark.parametrize("value", HOSTILE_FLASHES)
async def test_a_flash_cookie_that_is_not_ours_is_ignored(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, value: str
) -> None:
    signed_in = cookie_value(TOKEN)
    for path, cookies in [
        ("/dashboard", {"outbox_admin": signed_in, "outbox_flash": value}),
        ("/dashboard/login", {"outbox_flash": value}),
    ]:
        response = await admin_client.get(path, headers=cookie_header(**cookies))
        assert response.status_code == 200, (path, response.text[:300])
        assert 'id="flash"' not in response.text
