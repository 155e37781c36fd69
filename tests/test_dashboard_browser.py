"""The dashboard end to end: the library's admin host (tests/admin_host.py, an app of
``outbox_worker.web`` alone) served by uvicorn on a real socket, driven by Debian's Chromium
through Playwright (never a downloaded browser). The sample service's own tests are in
tests/sample/.

Screenshots land in test-artifacts/ (git-ignored): dashboard.png (the overview),
dashboard-job.png (the retried job's page) and dashboard-queue.png (a queue's settings).
"""

from __future__ import annotations

import asyncio
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
from playwright.async_api import Page, async_playwright, expect

from outbox_worker.devdb import free_port
from outbox_worker.web.auth import COOKIE, SESSION_MAX_AGE, read_session
from tests.conftest import ROOT, WorkerProcess
from tests.dashboard_support import TOKEN, job_state

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


async def test_set_a_rate_per_key_on_the_queue_settings_page(
    served: Served, page: Page, pool: asyncpg.Pool
) -> None:
    await pool.execute("INSERT INTO outbox_jobs (task, queue) VALUES ('echo', 'emails')")
    await pool.execute("INSERT INTO outbox_queues (name, concurrency) VALUES ('emails', 4)")
    await page.goto(f"{served.url}/dashboard/login")
    await sign_in(page, served)
    row = page.locator("#queues tr[data-queue='emails']")
    await expect(row.locator("[data-limit='concurrency']")).to_have_text("4 running")
    await expect(row.locator("[data-limit='key_rate']")).to_have_count(0)

    await row.locator("a.settings-link").click()
    await expect(page).to_have_url(f"{served.url}/dashboard/queues/emails")
    await expect(page.locator("#concurrency")).to_have_value("4")
    await expect(page.locator("#key_rate_limit")).to_have_value("")
    await expect(page.locator("#key_rate_period")).to_have_value("1")

    # Half typed, past the overview's refresh interval: this page does not refresh.
    await page.fill("#key_rate_limit", "5")
    await page.wait_for_timeout(6_000)
    await expect(page.locator("#key_rate_limit")).to_have_value("5")

    # A window the service refuses: named in the flash, nothing changed.
    await page.fill("#key_rate_period", "0")
    await page.click("#save")
    await expect(page.locator("#flash.error")).to_contain_text(
        "Not changed: key_rate_period must be more than 0"
    )
    assert (
        await pool.fetchval("SELECT key_rate_limit FROM outbox_queues WHERE name = 'emails'")
        is None
    )

    await page.fill("#key_rate_limit", "5")
    await page.fill("#key_rate_period", "2")
    await page.click("#save")
    await expect(page).to_have_url(f"{served.url}/dashboard/queues/emails")
    await expect(page.locator("#flash.ok")).to_have_text(
        "Queue emails: at most 4 running at once; at most 5 started per key per 2.0 s."
    )
    await expect(page.locator("#key_rate_limit")).to_have_value("5")
    await expect(page.locator("#key_rate_period")).to_have_value("2")
    settings = await pool.fetchrow(
        "SELECT concurrency, key_rate_limit, key_rate_period FROM outbox_queues "
        "WHERE name = 'emails'"
    )
    assert dict(settings) == {"concurrency": 4, "key_rate_limit": 5, "key_rate_period": 2.0}
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard-queue.png"), full_page=True)

    await page.click("nav >> text=Overview")
    await expect(row.locator("[data-limit='key_rate']")).to_have_text("5 starts per key / 2.0 s")


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
