"""Queue settings on the dashboard, through the library's admin host in process: the overview
shows each queue's settings in short and its pause (queues with settings alone too); a queue's
settings page shows them all and its one form changes them all together or none, Pause and
Resume too, whichever session dependency the app mounts the router with; bad input, other
sites and signed-out browsers change nothing."""

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


SETTINGS = (
    "concurrency",
    "key_concurrency",
    "rate_limit",
    "rate_period",
    "key_rate_limit",
    "key_rate_period",
    "breaker_threshold",
)
# The settings page's form as a browser sends it: every field, empty for none.
NONE = dict.fromkeys(SETTINGS, "")
EVERY = {
    "concurrency": "5",
    "key_concurrency": "2",
    "rate_limit": "50",
    "rate_period": "1",
    "key_rate_limit": "3",
    "key_rate_period": "0.5",
    "breaker_threshold": "10",
}


async def row(pool: asyncpg.Pool, name: str) -> dict[str, Any]:
    found = await pool.fetchrow(
        f"SELECT {', '.join(SETTINGS)}, paused_at IS NOT NULL AS paused, paused_by, "
        "pause_reason FROM outbox_queues WHERE name = $1",
        name,
    )
    assert found is not None, f"no settings for queue {name}"
    return dict(found)


def queue_row(page: str, queue: str) -> str:
    """The overview's table row of one queue."""
    found = re.search(rf'<tr data-queue="{re.escape(queue)}">(.*?)</tr>', page, re.DOTALL)
    assert found is not None, f"no row for queue {queue} in the overview"
    return found.group(1)


def shown_limits(cells: str) -> dict[str, str]:
    """The settings an overview row shows in short, by kind."""
    return dict(re.findall(r'<div data-limit="([a-z_]+)">([^<]*)</div>', cells))


def form_values(page: str) -> dict[str, str]:
    """What the settings page's form holds, field by field."""
    found = dict(
        re.findall(
            r'<input type="number" id="[a-z_]+" name="([a-z_]+)"[^>]*?value="([^"]*)"',
            page,
            re.DOTALL,
        )
    )
    assert set(found) == set(SETTINGS), found
    return found


def sent_form(page: str, **typed: str) -> dict[str, str]:
    """What a browser sends from the settings page's form: every input as the page filled
    it, hidden ones too, with what the operator ``typed`` into some."""
    start = page.index('id="settings-form"')
    form = page[start : page.index("</form>", start)]
    found = dict(
        re.findall(
            r'<input type="(?:number|hidden)"[^>]*?name="([a-z_]+)"[^>]*?value="([^"]*)"', form
        )
    )
    assert set(typed) <= set(SETTINGS) <= set(found), found
    return {**found, **typed}


def flash_of(response: httpx.Response, back: str = "/dashboard/queues/emails") -> tuple[str, str]:
    assert response.status_code == 303, response.text[:300]
    assert response.headers["location"] == back
    flash = decode_flash(response.cookies.get(FLASH_COOKIE))
    assert flash is not None
    return flash.kind, flash.text


def with_flash(response: httpx.Response) -> dict[str, str]:
    """The headers of the next page the browser asks for: the session, and the flash."""
    return {"Cookie": f"{SIGNED_IN['Cookie']}; {FLASH_COOKIE}={response.cookies[FLASH_COOKIE]}"}


def client_of(get_session: SessionDependency) -> httpx.AsyncClient:
    """The admin host on that session dependency, admin on; its 500s come back as answers."""
    host = create_admin_host(get_session, admin_token=TOKEN)
    transport = httpx.ASGITransport(app=host, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url=HOST)


async def test_the_overview_shows_each_queues_settings_and_pause(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await pool.execute("INSERT INTO outbox_jobs (task) VALUES ('echo')")  # default: no settings
    await pool.execute("INSERT INTO outbox_jobs (task, queue) VALUES ('echo', 'emails')")
    await pool.execute(
        "INSERT INTO outbox_queues (name, concurrency, key_concurrency, rate_limit, "
        "rate_period, key_rate_limit, key_rate_period, breaker_threshold) "
        "VALUES ('emails', 3, 1, 50, 1, 5, 60, 10)"
    )
    await pool.execute(
        "INSERT INTO outbox_queues (name, paused_at, paused_by, pause_reason) VALUES "
        "('archive', now(), 'breaker', 'too many <b>failures</b>'), "
        "('reports', now(), 'operator', NULL)"
    )  # settings, no jobs
    page = await admin_client.get("/dashboard", headers=SIGNED_IN)
    assert page.status_code == 200
    assert "No jobs yet" not in page.text
    # The overview refreshes itself, so it holds no field to type into (a refresh would wipe
    # it): the settings are changed on each queue's own page.
    assert '<meta http-equiv="refresh" content="5">' in page.text
    assert "<input" not in page.text

    default = queue_row(page.text, "default")
    assert shown_limits(default) == {}
    assert '<div class="muted">none</div>' in default
    assert 'href="/dashboard/queues/default"' in default
    assert "active" in default
    assert 'action="/dashboard/queues/default/pause"' in default
    assert "/resume" not in default

    emails = queue_row(page.text, "emails")
    assert shown_limits(emails) == {
        "concurrency": "3 running",
        "key_concurrency": "1 running per key",
        "rate": "50 starts / 1.0 s",
        "key_rate": "5 starts per key / 1 min",
        "breaker": "breaker: 10 failures",
    }
    assert "none" not in emails
    assert 'href="/dashboard/queues/emails"' in emails
    assert 'action="/dashboard/queues/emails/pause"' in emails

    archive = queue_row(page.text, "archive")
    assert shown_limits(archive) == {}
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


async def test_the_settings_page_shows_the_settings_in_force(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await pool.execute(
        "INSERT INTO outbox_queues (name, concurrency, rate_limit, rate_period, key_rate_limit, "
        "key_rate_period, breaker_threshold, paused_at, paused_by, pause_reason) "
        "VALUES ('emails', 4, 50, 1, 5, 0.25, 3, now(), 'breaker', 'task <b>send</b> failed')"
    )
    page = await admin_client.get("/dashboard/queues/emails", headers=SIGNED_IN)
    assert page.status_code == 200
    # Unlike the overview, it never refreshes: what is typed in its form stays.
    assert "http-equiv" not in page.text
    assert page.headers["cache-control"] == "no-store"
    assert form_values(page.text) == {
        "concurrency": "4",
        "key_concurrency": "",
        "rate_limit": "50",
        "rate_period": "1",
        "key_rate_limit": "5",
        "key_rate_period": "0.25",
        "breaker_threshold": "3",
    }
    assert 'action="/dashboard/queues/emails/settings"' in page.text
    text = html.unescape(page.text)
    assert (
        "In force: paused (task <b>send</b> failed); when resumed, at most 4 running at once; "
        "at most 50 started per 1.0 s; at most 5 started per key per 0.2 s; pauses itself "
        "after 3 failures in a row." in text
    )
    assert "task <b>send" not in page.text  # escaped
    assert 'id="queue-status">paused by breaker<' in page.text
    assert re.search(r"Paused by <strong>breaker</strong>", page.text)
    assert 'action="/dashboard/queues/emails/resume"' in page.text
    assert 'name="back" value="queue"' in page.text

    # A queue with no settings (nor jobs) yet: the defaults, and a form to set them first.
    page = await admin_client.get("/dashboard/queues/later", headers=SIGNED_IN)
    assert page.status_code == 200
    assert form_values(page.text) == {**NONE, "rate_period": "1", "key_rate_period": "1"}
    assert "In force: running, no limit." in page.text
    assert 'id="pause-state">Not paused.' in page.text
    assert 'action="/dashboard/queues/later/pause"' in page.text
    assert [r["name"] for r in await queue_settings_rows(pool)] == ["emails"]

    page = await admin_client.get("/dashboard/queues/1st", headers=SIGNED_IN)
    assert page.status_code == 404
    assert "No such queue" in page.text
    assert "queue names must match" in page.text

    # Signed out: to the login form, and back to this page after it.
    page = await admin_client.get("/dashboard/queues/emails")
    assert page.status_code == 303
    assert page.headers["location"] == "/dashboard/login?next=%2Fdashboard%2Fqueues%2Femails"


@pytest.mark.parametrize("dependency", [plain, begun], ids=["plain", "begun"])
async def test_every_setting_is_set_shown_and_lifted_from_the_settings_page(
    engine: AsyncEngine,
    pool: asyncpg.Pool,
    dependency: Callable[[AsyncEngine], SessionDependency],
) -> None:
    await pool.execute("INSERT INTO outbox_jobs (task, queue) VALUES ('echo', 'emails')")
    async with client_of(dependency(engine)) as client:
        response = await client.post("/dashboard/queues/emails/settings", data=EVERY, headers=FORM)
        assert flash_of(response) == (
            "ok",
            "Queue emails: at most 5, 2 per key running at once; at most 50 started per "
            "1.0 s; at most 3 started per key per 0.5 s; pauses itself after 10 failures in "
            "a row.",
        )
        assert await row(pool, "emails") == {
            "concurrency": 5,
            "key_concurrency": 2,
            "rate_limit": 50,
            "rate_period": 1.0,
            "key_rate_limit": 3,
            "key_rate_period": 0.5,
            "breaker_threshold": 10,
            "paused": False,
            "paused_by": None,
            "pause_reason": None,
        }
        # Back on the settings page: the flash, and the form holding what is in force.
        page = await client.get("/dashboard/queues/emails", headers=with_flash(response))
        assert 'class="flash ok"' in page.text
        assert "Queue emails: at most 5, 2 per key" in page.text
        assert form_values(page.text) == EVERY
        overview = await client.get("/dashboard", headers=SIGNED_IN)
        assert shown_limits(queue_row(overview.text, "emails")) == {
            "concurrency": "5 running",
            "key_concurrency": "2 running per key",
            "rate": "50 starts / 1.0 s",
            "key_rate": "3 starts per key / 0.5 s",
            "breaker": "breaker: 10 failures",
        }

        # Each field on its own, the others sent as they are: one setting changes.
        for field, value, column, stored in [
            ("concurrency", " 7 ", "concurrency", 7),
            ("key_concurrency", "1", "key_concurrency", 1),
            ("rate_limit", "100", "rate_limit", 100),
            ("rate_period", "60", "rate_period", 60.0),
            ("key_rate_limit", "9", "key_rate_limit", 9),
            ("key_rate_period", "3600", "key_rate_period", 3600.0),
            ("breaker_threshold", "4", "breaker_threshold", 4),
        ]:
            before = await row(pool, "emails")
            page = await client.get("/dashboard/queues/emails", headers=SIGNED_IN)
            response = await client.post(
                "/dashboard/queues/emails/settings",
                data={**form_values(page.text), field: value},
                headers=FORM,
            )
            assert flash_of(response)[0] == "ok"
            assert await row(pool, "emails") == {**before, column: stored}, field

        # Empty lifts every limit; an empty window is a second.
        response = await client.post("/dashboard/queues/emails/settings", data=NONE, headers=FORM)
        assert flash_of(response) == ("ok", "Queue emails: running, no limit.")
        assert await row(pool, "emails") == {
            **dict.fromkeys(SETTINGS),
            "rate_period": 1.0,
            "key_rate_period": 1.0,
            "paused": False,
            "paused_by": None,
            "pause_reason": None,
        }
        overview = await client.get("/dashboard", headers=SIGNED_IN)
        assert shown_limits(queue_row(overview.text, "emails")) == {}

        # A field not sent (a script's post) keeps its setting; the settings keep the pause.
        await pool.execute(
            "UPDATE outbox_queues SET concurrency = 2, paused_at = now(), "
            "paused_by = 'operator' WHERE name = 'emails'"
        )
        response = await client.post(
            "/dashboard/queues/emails/settings",
            data={"key_rate_limit": "5", "key_rate_period": "1"},
            headers=FORM,
        )
        assert flash_of(response) == (
            "ok",
            "Queue emails: paused; when resumed, at most 2 running at once; at most 5 "
            "started per key per 1.0 s.",
        )
        assert await row(pool, "emails") == {
            **dict.fromkeys(SETTINGS),
            "concurrency": 2,
            "rate_period": 1.0,
            "key_rate_limit": 5,
            "key_rate_period": 1.0,
            "paused": True,
            "paused_by": "operator",
            "pause_reason": None,
        }

        # A queue with no jobs yet is set up before its first job.
        response = await client.post(
            "/dashboard/queues/later/settings",
            data={**NONE, "concurrency": "1"},
            headers=FORM,
        )
        assert flash_of(response, "/dashboard/queues/later")[0] == "ok"
        assert (await row(pool, "later"))["concurrency"] == 1
        overview = await client.get("/dashboard", headers=SIGNED_IN)
        assert shown_limits(queue_row(overview.text, "later")) == {"concurrency": "1 running"}


@pytest.mark.parametrize("dependency", [plain, begun], ids=["plain", "begun"])
async def test_the_form_keeps_a_change_made_elsewhere_since_the_page_was_loaded(
    engine: AsyncEngine,
    pool: asyncpg.Pool,
    dependency: Callable[[AsyncEngine], SessionDependency],
) -> None:
    """Only the fields the operator changed are written: a limit set by SQL (or the CLI, the
    API, another operator) after the page was loaded is not put back to what it showed."""
    await pool.execute(
        "INSERT INTO outbox_queues (name, concurrency, rate_limit) VALUES ('emails', 5, 50)"
    )
    async with client_of(dependency(engine)) as client:
        page = await client.get("/dashboard/queues/emails", headers=SIGNED_IN)
        assert form_values(page.text)["concurrency"] == "5"
        await pool.execute("UPDATE outbox_queues SET concurrency = 8, rate_limit = 40")
        response = await client.post(
            "/dashboard/queues/emails/settings",
            data=sent_form(page.text, key_concurrency="3", rate_limit="20"),
            headers=FORM,
        )
    assert flash_of(response) == (
        "ok",
        "Queue emails: at most 8, 3 per key running at once; at most 20 started per 1.0 s.",
    )
    settings = await row(pool, "emails")
    assert (settings["concurrency"], settings["key_concurrency"], settings["rate_limit"]) == (
        8,
        3,
        20,
    )


@pytest.mark.parametrize("dependency", [plain, begun], ids=["plain", "begun"])
async def test_pause_and_resume_go_back_to_the_page_they_were_sent_from(
    engine: AsyncEngine,
    pool: asyncpg.Pool,
    dependency: Callable[[AsyncEngine], SessionDependency],
) -> None:
    await pool.execute("INSERT INTO outbox_jobs (task, queue) VALUES ('echo', 'emails')")
    async with client_of(dependency(engine)) as client:
        response = await client.post(
            "/dashboard/queues/emails/pause",
            data={"reason": " smtp down ", "back": "queue"},
            headers=FORM,
        )
        kind, said = flash_of(response)
        assert kind == "ok"
        assert "Queue emails is paused" in said
        assert (await row(pool, "emails"))["pause_reason"] == "smtp down"
        page = await client.get("/dashboard/queues/emails", headers=with_flash(response))
        assert "Queue emails is paused" in html.unescape(page.text)
        assert "Paused by <strong>operator</strong>" in page.text
        assert '<span class="pause-reason">smtp down</span>' in page.text

        response = await client.post(
            "/dashboard/queues/emails/resume", data={"back": "queue"}, headers=FORM
        )
        assert flash_of(response)[0] == "ok"
        assert (await row(pool, "emails"))["paused"] is False

        # From the overview (no back field): back to the overview.
        response = await client.post("/dashboard/queues/emails/pause", headers=FORM)
        kind, said = flash_of(response, "/dashboard")
        assert "Queue emails is paused" in said
        assert await row(pool, "emails") == {
            **dict.fromkeys(SETTINGS),
            "rate_period": 1.0,
            "key_rate_period": 1.0,
            "paused": True,
            "paused_by": "operator",
            "pause_reason": None,
        }
        page = await client.get("/dashboard", headers=with_flash(response))
        assert "Queue emails is paused" in html.unescape(page.text)
        emails = queue_row(page.text, "emails")
        assert "by operator" in emails
        assert 'action="/dashboard/queues/emails/resume"' in emails
        response = await client.post("/dashboard/queues/emails/resume", headers=FORM)
        kind, said = flash_of(response, "/dashboard")
        assert "Queue emails is resumed" in said
        assert (await row(pool, "emails"))["paused"] is False


@pytest.mark.parametrize(
    ("form", "fragment"),
    [
        ({"concurrency": "0"}, "concurrency must be a whole number from 1 to 1000000"),
        ({"concurrency": "-1"}, "concurrency must be a whole number"),
        ({"concurrency": "abc"}, "concurrency must be a whole number"),
        ({"concurrency": "2.5"}, "concurrency must be a whole number"),
        ({"concurrency": "true"}, "concurrency must be a whole number"),
        ({"concurrency": "１２"}, "concurrency must be a whole number"),
        ({"concurrency": "1000001"}, "got 1000001"),
        ({"concurrency": "9" * 5000}, "concurrency must be a whole number"),
        ({"key_concurrency": "0"}, "key_concurrency must be a whole number"),
        ({"key_concurrency": "x"}, "key_concurrency must be a whole number"),
        ({"rate_limit": "0"}, "rate_limit must be a whole number"),
        ({"rate_limit": "50/1s"}, "rate_limit must be a whole number"),
        ({"rate_period": "0"}, "rate_period must be more than 0"),
        ({"rate_period": "86401"}, "rate_period must be more than 0 and at most 86400"),
        ({"rate_period": "1e3"}, "rate_period must be a number of seconds"),
        ({"rate_period": "inf"}, "rate_period must be a number of seconds"),
        ({"rate_period": "nan"}, "rate_period must be a number of seconds"),
        ({"rate_period": "-1"}, "rate_period must be a number of seconds"),
        ({"rate_period": "1s"}, "rate_period must be a number of seconds"),
        ({"key_rate_limit": "0"}, "key_rate_limit must be a whole number"),
        ({"key_rate_limit": "many"}, "key_rate_limit must be a whole number"),
        ({"key_rate_period": "0.0"}, "key_rate_period must be more than 0"),
        ({"key_rate_period": "a day"}, "key_rate_period must be a number of seconds"),
        ({"key_rate_period": "172800"}, "key_rate_period must be more than 0"),
        ({"breaker_threshold": "0"}, "breaker_threshold must be a whole number"),
        ({"breaker_threshold": "off"}, "breaker_threshold must be a whole number"),
    ],
)
@pytest.mark.parametrize("dependency", [plain, begun], ids=["plain", "begun"])
async def test_one_bad_field_is_named_in_an_error_flash_and_changes_nothing(
    engine: AsyncEngine,
    pool: asyncpg.Pool,
    dependency: Callable[[AsyncEngine], SessionDependency],
    form: dict[str, str],
    fragment: str,
) -> None:
    await pool.execute(
        "INSERT INTO outbox_queues (name, concurrency, paused_at, paused_by) "
        "VALUES ('emails', 2, now(), 'operator')"
    )
    before = await queue_settings_rows(pool)
    # Every other field a good new value, written before the bad one is refused (the range
    # checks run as each setting is written): all of them must be rolled back.
    async with client_of(dependency(engine)) as client:
        response = await client.post(
            "/dashboard/queues/emails/settings", data={**EVERY, **form}, headers=FORM
        )
        kind, said = flash_of(response)
        assert kind == "error"
        assert said.startswith("Not changed: ")
        assert fragment in said
        assert await queue_settings_rows(pool) == before
        page = await client.get("/dashboard/queues/emails", headers=with_flash(response))
        assert 'class="flash error"' in page.text
        assert fragment in html.unescape(page.text)
        assert form_values(page.text)["concurrency"] == "2"


@pytest.mark.parametrize(
    ("path", "form"),
    [
        ("/dashboard/queues/no%20such%3B%20queue/settings", {"concurrency": "3"}),
        ("/dashboard/queues/1st/pause", {"back": "queue"}),
        (f"/dashboard/queues/{'q' * 129}/pause", {}),
        ("/dashboard/queues/no%20such%3B%20queue/resume", {"back": "queue"}),
    ],
)
async def test_a_bad_queue_name_is_an_error_flash_on_the_overview(
    admin_app: FastAPI,
    admin_client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    path: str,
    form: dict[str, str],
) -> None:
    response = await admin_client.post(path, data=form, headers=FORM)
    kind, said = flash_of(response, "/dashboard")
    assert kind == "error"
    assert said.startswith("Not ")
    assert "queue names must match" in said
    assert await queue_settings_rows(pool) == []


async def test_a_pause_reason_too_long_is_refused(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    response = await admin_client.post(
        "/dashboard/queues/emails/pause", data={"reason": "x" * 501, "back": "queue"}, headers=FORM
    )
    assert flash_of(response) == (
        "error",
        "Not paused: a pause reason is text of at most 500 characters.",
    )
    assert await queue_settings_rows(pool) == []


ACTIONS: list[tuple[str, dict[str, str]]] = [
    ("/dashboard/queues/emails/pause", {"back": "queue"}),
    ("/dashboard/queues/emails/resume", {"back": "queue"}),
    ("/dashboard/queues/emails/settings", EVERY),
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


async def test_with_no_token_configured_the_page_and_forms_are_refused(
    admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    page = await admin_client.get("/dashboard/queues/emails", headers=SIGNED_IN)
    assert page.status_code == 403
    assert "Admin is disabled" in page.text
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
