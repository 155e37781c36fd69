"""The sample service's HTTP routes, through the ASGI app on real PostgreSQL: a route's rows
and its job are committed by the time the response is sent, and rolled back together when
anything fails after the enqueue, an unexpected error being a 500 that still carries the
request id."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from outbox_worker import EnqueueError, Job, Outbox
from tests.sample.support import assert_json_detail, probing_client, table_counts

CREATING_ROUTES = [
    pytest.param(
        "/signup",
        {"email": "commit@example.com"},
        "SELECT (SELECT count(*) FROM users) + (SELECT count(*) FROM outbox_jobs)",
        2,
        id="signup",
    ),
    pytest.param(
        "/reports",
        {},
        "SELECT (SELECT count(*) FROM reports) + (SELECT count(*) FROM outbox_jobs)",
        2,
        id="reports",
    ),
    pytest.param(
        "/comments", {"author": "a", "body": "b"}, "SELECT count(*) FROM comments", 1, id="comments"
    ),
]


@pytest.mark.parametrize(("path", "body", "count_sql", "expected"), CREATING_ROUTES)
async def test_rows_are_committed_by_the_time_the_response_is_sent(
    app: FastAPI,
    pool: asyncpg.Pool,
    path: str,
    body: dict[str, Any],
    count_sql: str,
    expected: int,
) -> None:
    """A 201/202 is a promise: a client that has the answer must be able to read what it
    created (GET /reports/{id}), and a commit failing after the answer would break it."""
    visible_when_sent: list[int] = []

    async def on_sent() -> None:
        visible_when_sent.append(await pool.fetchval(count_sql))

    async with probing_client(app, on_sent) as client:
        response = await client.post(path, json=body)

    assert response.status_code in (201, 202), response.text
    assert await pool.fetchval(count_sql) == expected
    assert visible_when_sent == [expected], "the response went out before the commit"


ENQUEUE_TARGETS = [
    pytest.param("/reports", {}, id="reports"),
    pytest.param("/signup", {"email": "atomic@example.com"}, id="signup"),
]


@pytest.mark.parametrize(("path", "body"), ENQUEUE_TARGETS)
async def test_a_failure_after_enqueue_rolls_back_the_row_and_the_job(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    body: dict[str, Any],
) -> None:
    real_enqueue = Outbox.enqueue
    written: list[int] = []

    async def enqueue_then_fail(self: Outbox, *args: Any, **kwargs: Any) -> Job:
        job: Job = await real_enqueue(self, *args, **kwargs)
        written.append(job.id)
        raise EnqueueError("the job could not be enqueued")

    monkeypatch.setattr(Outbox, "enqueue", enqueue_then_fail)

    response = await client.post(path, json=body)

    assert response.status_code == 422, response.text
    assert assert_json_detail(response) == "the job could not be enqueued"
    assert len(written) == 1, "the job row was written inside the request's transaction"
    assert await table_counts(pool) == {
        "users": 0,
        "comments": 0,
        "reports": 0,
        "sent_emails": 0,
        "jobs": 0,
    }


@pytest.mark.parametrize(("path", "body"), ENQUEUE_TARGETS)
async def test_an_unexpected_error_is_a_500_that_rolls_back_everything(
    app: FastAPI,
    pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    body: dict[str, Any],
) -> None:
    real_enqueue = Outbox.enqueue

    async def enqueue_then_crash(self: Outbox, *args: Any, **kwargs: Any) -> Job:
        await real_enqueue(self, *args, **kwargs)
        raise RuntimeError("boom")

    monkeypatch.setattr(Outbox, "enqueue", enqueue_then_crash)

    async def nothing() -> None:
        return None

    async with probing_client(app, nothing, raise_app_exceptions=False) as client:
        response = await client.post(path, json=body)

    assert response.status_code == 500
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 0
    assert await pool.fetchval("SELECT count(*) FROM reports") == 0
    assert await pool.fetchval("SELECT count(*) FROM users") == 0


async def test_a_500_response_carries_the_request_id(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """*Every* response carries X-Request-ID, errors nobody handled included
    (that is when an operator most needs to find the request in the logs)."""

    async def crash(*args: Any, **kwargs: Any) -> Job:
        raise RuntimeError("boom")

    monkeypatch.setattr(Outbox, "enqueue", crash)

    async def nothing() -> None:
        return None

    async with probing_client(app, nothing, raise_app_exceptions=False) as client:
        response = await client.post("/reports", json={}, headers={"X-Request-ID": "crash-1"})

    assert response.status_code == 500
    assert response.headers.get("x-request-id") == "crash-1"
