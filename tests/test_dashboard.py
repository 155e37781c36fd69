"""The dashboard end to end: the library's admin host (tests/admin_host.py, an app of
``outbox_worker.web`` alone) served by uvicorn on a real socket, driven by Debian's Chromium
through Playwright (never a downloaded browser), plus its refusals and pages through the same
host in process (``admin_host``). The sample service's own tests are in tests/sample/.

Screenshots land in test-artifacts/ (git-ignored): dashboard.png (the overview) and
dashboard-job.png (the retried job's page).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from itsdangerous import TimestampSigner
from playwright.async_api import Page, async_playwright, expect
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from outbox_worker import sqlalchemy_url
from outbox_worker.devdb import free_port
from outbox_worker.jobs import MAX_JSON_DEPTH, TOO_DEEP
from outbox_worker.web import create_admin_router
from outbox_worker.web.auth import COOKIE, SESSION_MAX_AGE, cookie_value, read_session
from outbox_worker.web.dashboard import format_duration
from tests.admin_host import begun, create_admin_host
from tests.conftest import ROOT, WorkerProcess, deep_json

TOKEN = "dashboard-token-for-the-e2e-test"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"


# --- the admin host under uvicorn, and the browser ------------------------------------------


@dataclass
class Served:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_uvicorn(database_url: str, token: str | None, log: Path) -> Served:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)}
    env.pop("OUTBOX_ADMIN_TOKEN", None)
    if token is not None:
        env["OUTBOX_ADMIN_TOKEN"] = token
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "tests.admin_host:from_environment",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Served(f"http://127.0.0.1:{port}", port, proc, log)


async def serve(database_url: str, token: str | None, log: Path) -> Served:
    """The admin host under uvicorn on a free port, once it answers (uvicorn answers only
    after the app has started)."""
    served = start_uvicorn(database_url, token, log)
    proc = served.proc
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(trust_env=False) as client:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"uvicorn exited with {proc.returncode}:\n{served.output()}")
            try:
                await client.get(f"{served.url}/dashboard/login")
            except httpx.TransportError:
                pass
            else:
                return served
            if time.monotonic() > deadline:
                stop(served)
                pytest.fail(f"uvicorn did not answer within 30 s:\n{served.output()}")
            await asyncio.sleep(0.1)


def stop(served: Served) -> None:
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGTERM)
        try:
            served.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait()


@pytest.fixture
async def served(database_url: str, tmp_path: Path) -> AsyncIterator[Served]:
    """The admin host under uvicorn on this test's database, with an admin token."""
    server = await serve(database_url, TOKEN, tmp_path / "uvicorn.log")
    try:
        yield server
    finally:
        stop(server)


def require_chromium() -> None:
    """Missing Chromium fails the test (CI installs it); it is never skipped."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: the dashboard tests drive Debian's Chromium "
            "(apt-get install -y chromium; .ci/run installs it). Playwright's own browser "
            "download is never used.",
            pytrace=False,
        )


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[Page]:
    """A tab of Debian's headless Chromium, on a fresh profile."""
    require_chromium()
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1200, "height": 640},
            device_scale_factor=1,
        )
        try:
            tab = context.pages[0] if context.pages else await context.new_page()
            yield tab
        finally:
            await context.close()


async def sign_in(page: Page, served: Served, token: str = TOKEN) -> None:
    await page.fill("#token", token)
    await page.click("button[type=submit]")


async def job_state(pool: asyncpg.Pool, job_id: int) -> str:
    state: str = await pool.fetchval("SELECT state FROM outbox_jobs WHERE id = $1", job_id)
    return state


async def make_dead_job(pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]) -> int:
    """A real dead job: ``flaky`` fails its one allowed attempt in a burst worker."""
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args, max_attempts) "
        "VALUES ('flaky', $1::jsonb, 1) RETURNING id",
        '{"failures": 1}',
    )
    worker = spawn_worker("--burst", "--queues", "default")
    assert worker.wait(60) == 0, worker.output()
    assert await job_state(pool, job_id) == "dead"
    return job_id


# --- end to end in Chromium -----------------------------------------------------------------


async def test_sign_in_see_a_dead_job_retry_it_and_watch_it_succeed(
    served: Served,
    page: Page,
    pool: asyncpg.Pool,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    job_id = await make_dead_job(pool, spawn_worker)
    # Other queues for the overview: a backlog no worker serves (due for 3 minutes), and a
    # dead job of another queue.
    await pool.execute(
        "INSERT INTO outbox_jobs (task, queue, args, run_at) "
        "SELECT 'echo', 'emails', jsonb_build_object('to', 'user' || n || '@example.com'), "
        "now() - make_interval(mins => 3, secs => n) FROM generate_series(1, 3) n"
    )
    await pool.execute(
        "INSERT INTO outbox_jobs (task, queue, state, attempts, max_attempts, last_error, "
        "finished_at) VALUES ('always_fails', 'reports', 'dead', 3, 3, "
        "'ValueError: this task always fails', now())"
    )

    # Not signed in: the overview sends the browser to the login form.
    await page.goto(f"{served.url}/dashboard")
    assert re.search(r"/dashboard/login\?next=%2Fdashboard$", page.url), page.url
    await sign_in(page, served)
    await expect(page).to_have_url(f"{served.url}/dashboard")
    await expect(
        page.locator("#queues tr[data-queue='default'] td[data-state='dead']")
    ).to_have_text("1")
    await expect(
        page.locator("#queues tr[data-queue='emails'] td[data-state='queued']")
    ).to_have_text("3")
    await expect(page.locator("#queues tr[data-queue='emails']")).to_contain_text("3 min")

    # The job list, filtered to dead jobs through the form.
    await page.click("nav >> text=Jobs")
    await page.select_option("select[name=state]", "dead")
    await page.fill("input[name=queue]", "default")
    await page.click("#filters button[type=submit]")
    await expect(page).to_have_url(re.compile(r"/dashboard/jobs\?state=dead&queue=default"))
    rows = page.locator("#jobs tbody tr")
    await expect(rows).to_have_count(1)
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard-jobs.png"), full_page=True)
    row = page.locator(f"#jobs tr[data-job-id='{job_id}']")
    await expect(row).to_contain_text("flaky")
    await expect(row).to_contain_text("dead")
    await expect(row).to_contain_text("planned failure 1 of 1")

    # The job's page: args, attempts, the traceback.
    await row.locator("a", has_text=f"#{job_id}").click()
    await expect(page).to_have_url(f"{served.url}/dashboard/jobs/{job_id}")
    await expect(page.locator("#job-state")).to_have_text("dead")
    await expect(page.locator("#job-attempts")).to_have_text("1 / 1")
    await expect(page.locator("#job-args")).to_have_text('{\n  "failures": 1\n}')
    await expect(page.locator("#job-error")).to_contain_text("RuntimeError: planned failure 1 of 1")

    # Retry, then a worker runs it; the page refreshes itself until it shows succeeded.
    await page.click("#retry")
    await expect(page.locator("#flash")).to_contain_text(f"Job {job_id} is queued again")
    await expect(page.locator("#job-state")).to_have_text("queued")
    assert await job_state(pool, job_id) == "queued"
    spawn_worker("--queues", "default")
    await expect(page.locator("#job-state")).to_have_text("succeeded", timeout=30_000)
    assert await job_state(pool, job_id) == "succeeded"
    await expect(page.locator("#job-attempts")).to_have_text("2 / 2")
    await expect(page.locator("#job-result")).to_have_text('"ok"')
    await page.screenshot(path=str(ARTIFACTS / "dashboard-job.png"), full_page=True)

    # Retrying a succeeded job is refused, with the reason, not an error page.
    await page.click("#retry")
    await expect(page.locator("#flash.error")).to_contain_text(
        f"Not retried: job {job_id} is succeeded"
    )
    await expect(page.locator("#job-state")).to_have_text("succeeded")

    # The overview: the worker is alive, the job counted as succeeded.
    await page.click("nav >> text=Overview")
    await expect(page.locator("#workers tbody tr")).to_have_count(1)
    await expect(
        page.locator("#queues tr[data-queue='default'] td[data-state='succeeded']")
    ).to_have_text("1")
    await expect(
        page.locator("#queues tr[data-queue='default'] td[data-state='dead']")
    ).to_have_text("0")
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    # Signing out drops the cookie: the next page is the login form again.
    await page.click("header button[type=submit]")
    await expect(page.locator("#flash")).to_have_text("Signed out.")
    await page.goto(f"{served.url}/dashboard/jobs")
    assert "/dashboard/login" in page.url


async def test_a_wrong_token_shows_the_error_and_signs_nobody_in(
    served: Served, page: Page
) -> None:
    await page.goto(f"{served.url}/dashboard/login")
    async with page.expect_response(
        lambda response: response.request.method == "POST" and "/dashboard/login" in response.url
    ) as answer:
        await sign_in(page, served, token="not-the-token-at-all")
    assert (await answer.value).status == 401
    await expect(page.locator("#login-error")).to_contain_text("not the admin token")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard-login.png"), full_page=True)
    assert not [c for c in await page.context.cookies() if c["name"] == COOKIE]
    await page.goto(f"{served.url}/dashboard")
    assert "/dashboard/login" in page.url


async def test_a_page_without_the_cookie_goes_to_login_and_back(served: Served, page: Page) -> None:
    response = await page.goto(f"{served.url}/dashboard/jobs?state=dead")
    assert response is not None
    assert response.status == 200
    assert page.url == f"{served.url}/dashboard/login?next=%2Fdashboard%2Fjobs%3Fstate%3Ddead"
    await sign_in(page, served)
    await expect(page).to_have_url(f"{served.url}/dashboard/jobs?state=dead")
    await expect(page.locator("#no-jobs")).to_be_visible()
    [cookie] = [c for c in await page.context.cookies() if c["name"] == COOKIE]
    assert read_session(TOKEN, cookie["value"]) is not None
    assert TOKEN not in cookie["value"]
    assert cookie["expires"] > time.time() + SESSION_MAX_AGE - 3600  # the browser drops it too
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/"
    assert cookie["secure"] is False  # plain http here; https requests get Secure


async def test_a_cross_site_form_cannot_retry_a_job(
    served: Served,
    page: Page,
    pool: asyncpg.Pool,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    job_id = await make_dead_job(pool, spawn_worker)
    await page.goto(f"{served.url}/dashboard/login")
    await sign_in(page, served)
    await expect(page).to_have_url(f"{served.url}/dashboard")
    # Another site (localhost is not 127.0.0.1 to the browser) posts a form to the dashboard,
    # from a page without the dashboard's Content-Security-Policy (its form-action).
    await page.goto(f"http://localhost:{served.port}/openapi.json")
    async with page.expect_response(lambda response: "/retry" in response.url) as answer:
        await page.evaluate(
            """(action) => {
                const form = document.createElement("form");
                form.method = "post";
                form.action = action;
                document.body.append(form);
                form.submit();
            }""",
            f"{served.url}/dashboard/jobs/{job_id}/retry",
        )
    assert (await answer.value).status == 403
    await expect(page.locator("h1")).to_have_text("Request refused")
    assert await job_state(pool, job_id) == "dead"


async def test_with_no_token_configured_the_served_dashboard_refuses(
    database_url: str, tmp_path: Path, page: Page
) -> None:
    server = await serve(database_url, None, tmp_path / "uvicorn-no-token.log")
    try:
        response = await page.goto(f"{server.url}/dashboard")
        assert response is not None
        assert response.status == 403
        await expect(page.locator("h1")).to_have_text("Admin is disabled")
        await expect(page.locator("#message")).to_contain_text("OUTBOX_ADMIN_TOKEN")
        response = await page.goto(f"{server.url}/dashboard/login")
        assert response is not None
        assert response.status == 403
        await expect(page.locator("#token")).to_have_count(0)
    finally:
        stop(server)


# --- refusals and pages through the admin host in process -----------------------------------

HOST = "http://testserver"
SIGNED_IN = {"Cookie": f"{COOKIE}={cookie_value(TOKEN)}"}


@pytest.fixture
def admin_app(admin_host: FastAPI) -> FastAPI:
    """The admin host with admin on: its token set."""
    admin_host.state.admin_token = TOKEN
    return admin_host


async def insert_dead(pool: asyncpg.Pool, task: str = "echo") -> int:
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, state, attempts, max_attempts, last_error, finished_at) "
        "VALUES ($1, 'dead', 1, 1, 'boom', now()) RETURNING id",
        task,
    )
    return job_id


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


# --- sessions: their age, signing out, wrong tokens, hostile cookies ------------------------


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


async def test_job_list_pages_with_the_cursor_and_reports_bad_filters(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await pool.execute(
        "INSERT INTO outbox_jobs (task, args) "
        "SELECT 'echo', jsonb_build_object('n', n) FROM generate_series(1, 60) n"
    )
    first = await admin_client.get("/dashboard/jobs", params={"task": "echo"}, headers=SIGNED_IN)
    assert first.status_code == 200
    first_ids = [int(i) for i in re.findall(r'data-job-id="(\d+)"', first.text)]
    assert len(first_ids) == 50
    assert first_ids == sorted(first_ids, reverse=True)
    next_link = re.search(r'href="([^"]+)" id="next-page"', first.text)
    assert next_link is not None
    href = next_link.group(1).replace("&amp;", "&")
    assert href == f"/dashboard/jobs?task=echo&cursor={first_ids[-1]}"
    second = await admin_client.get(href, headers=SIGNED_IN)
    second_ids = [int(i) for i in re.findall(r'data-job-id="(\d+)"', second.text)]
    assert len(second_ids) == 10
    assert max(second_ids) < min(first_ids)
    assert 'id="next-page"' not in second.text

    for params, fragment in [
        ({"state": "bogus"}, "state &#39;bogus&#39;"),
        ({"queue": "no such; queue"}, "is not a valid name"),
        ({"cursor": "abc"}, "cursor"),
        ({"cursor": "²"}, "cursor"),
        ({"cursor": str(2**63)}, "cursor"),
        ({"cursor": "9" * 19}, "cursor"),
    ]:
        response = await admin_client.get("/dashboard/jobs", params=params, headers=SIGNED_IN)
        assert response.status_code == 400, params
        assert fragment in response.text


async def test_job_page_escapes_what_jobs_carry_and_unknown_jobs_are_404(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    job_id: int = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args, correlation_id, last_error) "
        "VALUES ('echo', $1::jsonb, 'req-42', $2) RETURNING id",
        '{"html": "<script>alert(1)</script>"}',
        "Traceback:\n  <b>boom</b>",
    )
    page = await admin_client.get(f"/dashboard/jobs/{job_id}", headers=SIGNED_IN)
    assert page.status_code == 200
    assert "<script>alert(1)</script>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "&lt;b&gt;boom&lt;/b&gt;" in page.text
    assert "req-42" in page.text
    assert '<meta http-equiv="refresh" content="5">' in page.text
    assert page.headers["cache-control"] == "no-store"
    assert "script-src" not in page.headers["content-security-policy"]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    missing = await admin_client.get("/dashboard/jobs/999999", headers=SIGNED_IN)
    assert missing.status_code == 404
    assert "no job 999999" in missing.text
    response = await admin_client.post(
        "/dashboard/jobs/999999/retry", headers={**SIGNED_IN, "Origin": HOST}
    )
    assert response.status_code == 404


@pytest.mark.parametrize("job_id", [str(2**63), "9" * 40])
async def test_an_id_past_bigint_is_the_not_found_page(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, job_id: str
) -> None:
    for method, path in [
        ("GET", f"/dashboard/jobs/{job_id}"),
        ("POST", f"/dashboard/jobs/{job_id}/retry"),
        ("POST", f"/dashboard/jobs/{job_id}/cancel"),
    ]:
        response = await admin_client.request(method, path, headers={**SIGNED_IN, "Origin": HOST})
        assert response.status_code == 404, (method, path, response.text[:300])
        assert response.headers["content-type"].startswith("text/html")
        assert "Job not found" in response.text
        assert f"no job {job_id}" in response.text


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1000, 5000])
async def test_jobs_nested_deeper_than_readers_go_show_and_can_be_acted_on(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool, depth: int
) -> None:
    job_id = await insert_dead(pool)
    await pool.execute(
        "UPDATE outbox_jobs SET args = $2::jsonb, result = $2::jsonb WHERE id = $1",
        job_id,
        deep_json(depth),
    )
    listed = await admin_client.get("/dashboard/jobs", headers=SIGNED_IN)
    assert listed.status_code == 200, listed.text[:300]
    assert f'data-job-id="{job_id}"' in listed.text
    page = await admin_client.get(f"/dashboard/jobs/{job_id}", headers=SIGNED_IN)
    assert page.status_code == 200, page.text[:300]
    assert page.text.count(TOO_DEEP) == 2  # args and result
    for action, state in [("retry", "queued"), ("cancel", "cancelled")]:
        response = await admin_client.post(
            f"/dashboard/jobs/{job_id}/{action}", headers={**SIGNED_IN, "Origin": HOST}
        )
        assert response.status_code == 303, response.text[:300]
        assert await job_state(pool, job_id) == state


async def test_overview_with_no_jobs_and_no_worker(
    admin_app: FastAPI, admin_client: httpx.AsyncClient
) -> None:
    page = await admin_client.get("/dashboard", headers=SIGNED_IN)
    assert page.status_code == 200
    assert "No jobs yet" in page.text
    assert "No worker heartbeat seen" in page.text
    assert '<meta http-equiv="refresh" content="5">' in page.text


async def test_dashboard_routes_stay_out_of_the_openapi_schema(
    admin_app: FastAPI, admin_client: httpx.AsyncClient
) -> None:
    paths = (await admin_client.get("/openapi.json")).json()["paths"]
    assert "/jobs" in paths
    assert not [path for path in paths if path.startswith("/dashboard")]


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.0, "0.0 s"),
        (3.25, "3.2 s"),
        (42, "42 s"),
        (60, "1 min"),
        (185, "3 min 5 s"),
        (3660, "1 h 1 min"),
        (90000, "1 d 1 h"),
    ],
)
def test_durations_read_as_a_person_would_say_them(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


async def test_links_follow_the_prefix_the_app_mounts_the_router_under() -> None:
    async def no_session() -> AsyncIterator[AsyncSession]:
        raise AssertionError("no page here should open a session")
        yield  # pragma: no cover

    mounted = FastAPI()
    mounted.include_router(
        create_admin_router(get_session=no_session, admin_token=TOKEN), prefix="/ops"
    )
    transport = httpx.ASGITransport(app=mounted)
    async with httpx.AsyncClient(transport=transport, base_url=HOST) as client:
        response = await client.get("/ops/dashboard/jobs/7")
        assert response.status_code == 303
        assert (
            response.headers["location"]
            == "/ops/dashboard/login?next=%2Fops%2Fdashboard%2Fjobs%2F7"
        )
        login = await client.get(response.headers["location"])
        assert 'action="/ops/dashboard/login"' in login.text
        assert 'value="/ops/dashboard/jobs/7"' in login.text
        response = await client.post(
            "/ops/dashboard/login",
            data={"token": TOKEN, "next": "/ops/dashboard/jobs/7"},
            headers={"Origin": HOST},
        )
        assert response.status_code == 303
        assert response.headers["location"] == "/ops/dashboard/jobs/7"
        response = await client.post(
            "/ops/dashboard/login",
            data={"token": TOKEN, "next": "/dashboard/jobs/7"},
            headers={"Origin": HOST},
        )
        assert response.headers["location"] == "/ops/dashboard"
