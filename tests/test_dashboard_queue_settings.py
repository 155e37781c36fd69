"""Queue settings on the dashboard, through the library's admin host in process: the overview
shows each queue's limit and pause (queues with settings alone too), its Pause, Resume and
limit forms change ``outbox_queues`` and flash it, whichever session dependency the app mounts
the router with, and bad input, other sites and signed-out browsers change nothing."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from outbox_worker.web.auth import COOKIE, cookie_value
from outbox_worker.web.dashboard import FLASH_COOKIE, decode_flash
from tests.admin_host import SessionDependency, begun, create_admin_host, plain
from tests.admin_support import queue_settings_rows, refuse_commit_ddl
from tests.dashboard_support import HOST, SIGNED_IN, TOKEN

FORM = {**SIGNED_IN, "Origin": HOST}

REFUSE_COMMIT_DDL = refuse_commit_ddl("outbox_queues")


async def row(pool: asyncpg.Pool, name: str) -> dict[str, Any]:
    found = await pool.fetchrow(
        "SELECT concurrency, paused_at IS NOT NULL AS paused, paused_by, pause_reason "
        "FROM outbox_queues WHERE name = $1",
        name,
    )
    assert found is not None, f"no settings for queue {name}"
    return dict(found)


def queue_row(page: str, queue: str) -> str:
    """The overview's table row of one queue."""
    found = re.search(rf'<tr data-queue="{re.escape(queue)}">(.*?)</tr>', page, re.DOTALL)
    assert found is not None, f"no row for queue {queue} in the overview"
    return found.group(1)


def shown_limit(cells: str) -> str:
    found = re.search(r'name="concurrency"[^>]*?value="([^"]*)"', cells, re.DOTALL)
    assert found is not None, cells
    return found.group(1)


def flash_of(response: httpx.Response) -> tuple[str, str]:
    assert response.status_code == 303, response.text[:300]
    assert response.headers["location"] == "/dashboard"
    flash = decode_flash(response.cookies.get(FLASH_COOKIE))
    assert flash is not None
    return flash.kind, flash.text


def client_of(get_session: SessionDependency) -> httpx.AsyncClient:
    """The admin host on that session dependency, admin on; its 500s come back as answers."""
    host = create_admin_host(get_session, admin_token=TOKEN)
    transport = httpx.ASGITransport(app=host, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url=HOST)


async def test_the_overview_shows_each_queues_limit_and_pause(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await pool.execute("INSERT INTO outbox_jobs (task) VALUES ('echo')")  # default: no settings
    await pool.execute("INSERT INTO outbox_jobs (task, queue) VALUES ('echo', 'emails')")
    await pool.execute("INSERT INTO outbox_queues (name, concurrency) VALUES ('emails', 3)")
    await pool.execute(
        "INSERT INTO outbox_queues (name, paused_at, paused_by, pause_reason) VALUES "
        "('archive', now(), 'breaker', 'too many <b>failures</b>'), "
        "('reports', now(), 'operator', NULL)"
    )  # settings, no jobs
    page = await admin_client.get("/dashboard", headers=SIGNED_IN)
    assert page.status_code == 200
    assert "No jobs yet" not in page.text

    default = queue_row(page.text, "default")
    assert shown_limit(default) == ""
    assert "active" in default
    assert 'action="/dashboard/queues/default/pause"' in default
    assert "/resume" not in default

    emails = queue_row(page.text, "emails")
    assert shown_limit(emails) == "3"
    assert 'action="/dashboard/queues/emails/limit"' in emails
    assert 'action="/dashboard/queues/emails/pause"' in emails

    archive = queue_row(page.text, "archive")
    assert shown_limit(archive) == ""
    assert "paused" in archive
    assert "by breaker" in archive
    assert "too many &lt;b&gt;failures&lt;/b&gt;" in archive
    assert "<b>failures" not in page.text
    assert 'action="/dashboard/queues/archive/resume"' in archive
    assert "/pause" not in archive
    assert re.search(r'data-state="queued">\s*0\s*</td>', archive)

    reports = queue_row(page.text, "reports")
    assert "by operator" in reports
    assert 'action="/dashboard/queues/reports/resume"' in reports


@pytest.mark.parametrize("dependency", [plain, begun], ids=["plain", "begun"])
async def test_pause_resume_and_the_limit_change_the_table_and_flash(
    engine: AsyncEngine,
    pool: asyncpg.Pool,
    dependency: Callable[[AsyncEngine], SessionDependency],
) -> None:
    await pool.execute("INSERT INTO outbox_jobs (task, queue) VALUES ('echo', 'emails')")
    async with client_of(dependency(engine)) as client:
        response = await client.post("/dashboard/queues/emails/pause", headers=FORM)
        kind, said = flash_of(response)
        assert kind == "ok"
        assert "Queue emails is paused" in said
        assert await row(pool, "emails") == {
            "concurrency": None,
            "paused": True,
            "paused_by": "operator",
            "pause_reason": None,
        }
        # The next page shows the flash and the queue paused, with Resume.
        cookie = f"{SIGNED_IN['Cookie']}; {FLASH_COOKIE}={response.cookies[FLASH_COOKIE]}"
        page = await client.get("/dashboard", headers={"Cookie": cookie})
        assert "Queue emails is paused" in html.unescape(page.text)
        emails = queue_row(page.text, "emails")
        assert "by operator" in emails
        assert 'action="/dashboard/queues/emails/resume"' in emails

        response = await client.post(
            "/dashboard/queues/emails/limit", data={"concurrency": " 5 "}, headers=FORM
        )
        assert flash_of(response) == ("ok", "Queue emails runs at most 5 jobs at once.")
        assert (await row(pool, "emails"))["concurrency"] == 5
        assert (await row(pool, "emails"))["paused"] is True  # the limit keeps the pause
        page = await client.get("/dashboard", headers=SIGNED_IN)
        assert shown_limit(queue_row(page.text, "emails")) == "5"

        response = await client.post("/dashboard/queues/emails/resume", headers=FORM)
        kind, said = flash_of(response)
        assert kind == "ok"
        assert "Queue emails is resumed" in said
        assert await row(pool, "emails") == {
            "concurrency": 5,
            "paused": False,
            "paused_by": None,
            "pause_reason": None,
        }

        response = await client.post(
            "/dashboard/queues/emails/limit", data={"concurrency": ""}, headers=FORM
        )
        kind, said = flash_of(response)
        assert kind == "ok"
        assert "no limit" in said
        assert (await row(pool, "emails"))["concurrency"] is None

        # A queue with no jobs yet can be limited and paused before its first job.
        response = await client.post(
            "/dashboard/queues/later/limit", data={"concurrency": "1"}, headers=FORM
        )
        assert flash_of(response)[0] == "ok"
        assert (await row(pool, "later"))["concurrency"] == 1
        page = await client.get("/dashboard", headers=SIGNED_IN)
        assert shown_limit(queue_row(page.text, "later")) == "1"


@pytest.mark.parametrize(
    ("path", "form", "fragment"),
    [
        ("/dashboard/queues/emails/limit", {"concurrency": "0"}, "got 0"),
        ("/dashboard/queues/emails/limit", {"concurrency": "-1"}, "whole number"),
        ("/dashboard/queues/emails/limit", {"concurrency": "abc"}, "whole number"),
        ("/dashboard/queues/emails/limit", {"concurrency": "2.5"}, "whole number"),
        ("/dashboard/queues/emails/limit", {"concurrency": "true"}, "whole number"),
        ("/dashboard/queues/emails/limit", {"concurrency": "１２"}, "whole number"),
        ("/dashboard/queues/emails/limit", {"concurrency": "1000001"}, "1000001"),
        ("/dashboard/queues/emails/limit", {"concurrency": "9" * 5000}, "whole number"),
        ("/dashboard/queues/no%20such%3B%20queue/limit", {"concurrency": "3"}, "queue names"),
        ("/dashboard/queues/1st/pause", {}, "queue names"),
        (f"/dashboard/queues/{'q' * 129}/pause", {}, "queue names"),
        ("/dashboard/queues/no%20such%3B%20queue/resume", {}, "queue names"),
    ],
)
async def test_bad_input_is_an_error_flash_and_changes_nothing(
    admin_app: FastAPI,
    admin_client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    path: str,
    form: dict[str, str],
    fragment: str,
) -> None:
    await pool.execute(
        "INSERT INTO outbox_queues (name, concurrency, paused_at, paused_by) "
        "VALUES ('emails', 2, now(), 'operator')"
    )
    before = await queue_settings_rows(pool)
    response = await admin_client.post(path, data=form, headers=FORM)
    kind, said = flash_of(response)
    assert kind == "error"
    assert said.startswith("Not ")
    assert fragment in said
    assert await queue_settings_rows(pool) == before
    cookie = f"{SIGNED_IN['Cookie']}; {FLASH_COOKIE}={response.cookies[FLASH_COOKIE]}"
    page = await admin_client.get("/dashboard", headers={"Cookie": cookie})
    assert 'class="flash error"' in page.text
    assert fragment in html.unescape(page.text)


ACTIONS: list[tuple[str, dict[str, str]]] = [
    ("/dashboard/queues/emails/pause", {}),
    ("/dashboard/queues/emails/resume", {}),
    ("/dashboard/queues/emails/limit", {"concurrency": "9"}),
]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Referer": "http://evil.example/dashboard"},
    ],
)
async def test_a_post_from_another_site_changes_nothing(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool, headers: dict[str, str]
) -> None:
    await pool.execute("INSERT INTO outbox_queues (name, concurrency) VALUES ('emails', 2)")
    before = await queue_settings_rows(pool)
    for path, form in ACTIONS:
        response = await admin_client.post(path, data=form, headers={**SIGNED_IN, **headers})
        assert response.status_code == 403, response.text
        assert "Request refused" in response.text
    assert await queue_settings_rows(pool) == before


async def test_without_a_session_the_forms_go_to_login_and_change_nothing(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await pool.execute("INSERT INTO outbox_queues (name, concurrency) VALUES ('emails', 2)")
    before = await queue_settings_rows(pool)
    wrong = {"Cookie": f"{COOKIE}={cookie_value('some-other-token-entirely')}"}
    for path, form in ACTIONS:
        for headers in [{}, wrong]:
            response = await admin_client.post(path, data=form, headers={**headers, "Origin": HOST})
            assert response.status_code == 303, response.text
            assert response.headers["location"] == "/dashboard/login?next=%2Fdashboard"
    assert await queue_settings_rows(pool) == before


async def test_with_no_token_configured_the_forms_are_refused(
    admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    for path, form in ACTIONS:
        response = await admin_client.post(path, data=form, headers=FORM)
        assert response.status_code == 403, response.text
        assert "Admin is disabled" in response.text
    assert await queue_settings_rows(pool) == []


async def test_a_refused_commit_is_a_500_page_and_changes_nothing(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    await pool.execute(REFUSE_COMMIT_DDL)
    await pool.execute("INSERT INTO outbox_queues (name, concurrency) VALUES ('emails', 2)")
    before = await queue_settings_rows(pool)
    refuse = text("SELECT set_config('pgoutbox_test.refuse_commit', 'on', true)")

    async def refusing() -> AsyncIterator[AsyncSession]:
        async with AsyncSession(engine) as session, session.begin():
            await session.execute(refuse)
            yield session

    async with client_of(refusing) as client:
        for (path, form), title in zip(
            ACTIONS, ["Not paused", "Not resumed", "Not changed"], strict=True
        ):
            response = await client.post(path, data=form, headers=FORM)
            assert response.status_code == 500, response.text
            assert title in response.text
            assert "the test refuses this commit" in response.text
            assert "Nothing was changed" in response.text
    assert await queue_settings_rows(pool) == before
