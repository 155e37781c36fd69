"""The dashboard's pages through the library's admin host in process (``admin_host``): the
job list and its cursor, a job's page, jobs nested deeper than readers go, the overview,
durations as a person would say them, and links under the prefix the router is mounted at.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession

from outbox_worker.jobs import MAX_JSON_DEPTH, TOO_DEEP
from outbox_worker.web import create_admin_router
from outbox_worker.web.dashboard import format_duration
from tests.conftest import deep_json
from tests.dashboard_support import HOST, SIGNED_IN, TOKEN, insert_dead, job_state


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
