"""The admin service through its HTTP face, the JSON routes of
``outbox_worker.web.create_admin_router`` on the library's own host (``admin_host``): listing
and filters, keyset pagination, a job by id, queue stats, and the filters, ids and cursors no
job can match."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from tests.admin_support import AUTH, insert_job


async def test_list_filters_and_keyset_pagination(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    ids = [await insert_job(pool, "echo") for _ in range(7)]
    dead = await insert_job(
        pool, "echo", state="dead", attempts=5, last_error="boom", finished_at=None
    )
    other = await insert_job(pool, "noop", queue="other")
    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"task": "echo", "state": "queued", "limit": 3}
        if cursor:
            params["cursor"] = cursor
        body = (await admin_client.get("/jobs", params=params, headers=AUTH)).json()
        seen += [item["id"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == sorted(ids, reverse=True)
    body = (await admin_client.get("/jobs", params={"state": "dead"}, headers=AUTH)).json()
    assert [item["id"] for item in body["items"]] == [dead]
    assert body["items"][0]["last_error"] == "boom"
    body = (await admin_client.get("/jobs", params={"queue": "other"}, headers=AUTH)).json()
    assert [item["id"] for item in body["items"]] == [other]
    shown = (await admin_client.get(f"/jobs/{other}", headers=AUTH)).json()
    assert (shown["task"], shown["queue"], shown["state"]) == ("noop", "other", "queued")


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"state": "bogus"}, "state"),
        ({"queue": "no such; queue"}, "queue"),
        ({"task": "'; DROP TABLE x"}, "task"),
        ({"cursor": "abc"}, "cursor"),
        ({"cursor": "²"}, "cursor"),  # a digit to str.isdigit, not to int()
        ({"cursor": "１２"}, "cursor"),  # fullwidth digits: int() reads them, no id has them
        ({"cursor": str(2**63)}, "cursor"),  # 19 digits, past bigint
        ({"cursor": "9" * 19}, "cursor"),
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
    ],
)
async def test_bad_filters_are_422(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, params: dict[str, object], fragment: str
) -> None:
    response = await admin_client.get("/jobs", params=params, headers=AUTH)  # type: ignore[arg-type]
    assert response.status_code == 422
    assert fragment in json.dumps(response.json()["detail"])


async def test_unknown_job_is_404(admin_app: FastAPI, admin_client: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/jobs/999"),
        ("POST", "/jobs/999/retry"),
        ("POST", "/jobs/999/cancel"),
    ]:
        response = await admin_client.request(method, path, headers=AUTH)
        assert response.status_code == 404
        assert response.json()["detail"] == "no job 999"


@pytest.mark.parametrize(
    ("job_id", "status"),
    [
        ("0", 404),
        ("-1", 404),
        (str(2**63), 404),  # past bigint: never sent to the database
        ("9" * 30, 404),
        ("9" * 5000, 422),  # longer than pydantic reads an integer
    ],
)
async def test_an_id_no_job_can_have_is_a_4xx(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, job_id: str, status: int
) -> None:
    for method, path in [
        ("GET", f"/jobs/{job_id}"),
        ("POST", f"/jobs/{job_id}/retry"),
        ("POST", f"/jobs/{job_id}/cancel"),
    ]:
        response = await admin_client.request(method, path, headers=AUTH)
        assert response.status_code == status, (path[:40], response.text[:300])
        assert response.json()["detail"]


async def test_the_largest_cursor_is_accepted(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    job_id = await insert_job(pool, "echo")
    response = await admin_client.get("/jobs", params={"cursor": str(2**63 - 1)}, headers=AUTH)
    assert response.status_code == 200, response.text
    assert [item["id"] for item in response.json()["items"]] == [job_id]


async def test_queue_stats(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await insert_job(pool, "echo")
    await pool.execute("UPDATE outbox_jobs SET run_at = now() - interval '90 seconds'")
    await insert_job(pool, "echo")
    await pool.execute(
        "INSERT INTO outbox_jobs (task, run_at) VALUES ('echo', now() + interval '1 hour')"
    )
    await insert_job(pool, "echo", state="dead", attempts=1, max_attempts=1)
    await pool.execute("UPDATE outbox_jobs SET finished_at = now() WHERE state = 'dead'")
    body = (await admin_client.get("/queues", headers=AUTH)).json()
    [default] = [q for q in body["queues"] if q["queue"] == "default"]
    assert default["depth"] == {
        "queued": 3,
        "running": 0,
        "succeeded": 0,
        "dead": 1,
        "cancelled": 0,
    }
    assert default["due"] == 2
    assert 89 <= default["oldest_due_seconds"] < 600
    assert default["finished_recently"]["dead"] == 1


async def test_jobs_at_the_edges_of_run_at_list_and_show(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """The edges the table allows (outbox_jobs_run_at_readable) are readable everywhere: a row
    one step outside them used to make every listing that included it fail."""
    # As text: asyncpg would send these two instants as -infinity and infinity.
    insert = "INSERT INTO outbox_jobs (task, run_at) VALUES ('echo', $1::text::timestamptz)"
    first = await pool.fetchval(f"{insert} RETURNING id", "0001-01-01 00:00:00+00")
    last = await pool.fetchval(f"{insert} RETURNING id", "9999-12-31 23:59:59.999999+00")

    listed = await admin_client.get("/jobs", headers=AUTH)

    assert listed.status_code == 200, listed.text
    run_at = {item["id"]: item["run_at"] for item in listed.json()["items"]}
    assert datetime.fromisoformat(run_at[first]) == datetime(1, 1, 1, tzinfo=UTC)
    assert datetime.fromisoformat(run_at[last]) == datetime(
        9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC
    )
    for job_id in (first, last):
        shown = await admin_client.get(f"/jobs/{job_id}", headers=AUTH)
        assert shown.status_code == 200, shown.text
