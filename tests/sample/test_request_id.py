"""The X-Request-ID of the sample service's HTTP routes, through the ASGI app on real
PostgreSQL, with real ``outbox-worker run --burst`` processes running the jobs the routes
enqueue: echoed or generated on every response, stored on the job as its correlation id, and
logged by the worker that runs the job."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import WorkerProcess
from tests.sample.support import SpawnWorker, job_row, run_burst_worker, sign_up

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def json_lines(worker: WorkerProcess) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for line in worker.output().splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            lines.append(value)
    return lines


@pytest.mark.parametrize(
    "request_id",
    ["req-123", "A.b_c:d-E", "x" * 128, "1"],
    ids=["plain", "punctuation", "128-chars", "one-char"],
)
async def test_a_valid_request_id_is_echoed_and_stored_on_the_job(
    client: httpx.AsyncClient, pool: asyncpg.Pool, request_id: str
) -> None:
    headers = {"X-Request-ID": request_id}
    signup = await client.post("/signup", json={"email": "rid@example.com"}, headers=headers)
    report = await client.post("/reports", json={}, headers=headers)
    for response in (signup, report):
        assert response.status_code in (201, 202), response.text
        assert response.headers["x-request-id"] == request_id
        job = await job_row(pool, response.json()["job_id"])
        assert job["correlation_id"] == request_id


@pytest.mark.parametrize(
    "request_id",
    ["x" * 200, "x" * 129, "has spaces", "slash/char", "quote'", "", "ünïcode"],
    ids=["200-chars", "129-chars", "spaces", "slash", "quote", "empty", "non-ascii"],
)
async def test_an_invalid_request_id_is_replaced_by_a_generated_one(
    client: httpx.AsyncClient, pool: asyncpg.Pool, request_id: str
) -> None:
    headers = {b"X-Request-ID": request_id.encode()}
    response = await client.post("/reports", json={}, headers=headers)
    assert response.status_code == 202, response.text
    echoed = response.headers["x-request-id"]
    assert echoed != request_id
    assert REQUEST_ID.fullmatch(echoed), echoed
    job = await job_row(pool, response.json()["job_id"])
    assert job["correlation_id"] == echoed


async def test_without_a_request_id_each_request_gets_its_own(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    first = await client.post("/reports", json={})
    second = await client.post("/reports", json={})
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert all(REQUEST_ID.fullmatch(i) for i in ids), ids
    assert ids[0] != ids[1]
    stored = [(await job_row(pool, r.json()["job_id"]))["correlation_id"] for r in (first, second)]
    assert stored == ids


async def test_every_response_carries_a_request_id(
    client: httpx.AsyncClient,
) -> None:
    await sign_up(client, "dup@example.com")
    requests: list[tuple[str, str, dict[str, Any] | None, dict[str, str], int]] = [
        ("GET", "/healthz", None, {}, 200),
        ("GET", "/readyz", None, {}, 200),
        ("GET", "/no/such/route", None, {}, 404),
        ("GET", f"/reports/{uuid.uuid4()}", None, {}, 404),
        ("GET", "/reports/not-a-uuid", None, {}, 422),
        ("DELETE", "/reports", None, {}, 405),
        ("POST", "/signup", {"email": "nope"}, {}, 422),
        ("POST", "/signup", {"email": "dup@example.com"}, {}, 409),
        ("POST", "/reports", {}, {"Idempotency-Key": "bad key"}, 400),
        ("POST", "/comments", {"author": "a", "body": "b"}, {}, 201),
    ]
    for n, (method, path, body, headers, status) in enumerate(requests):
        generated = await client.request(method, path, json=body, headers=headers)
        assert generated.status_code == status, (method, path, generated.text)
        assert REQUEST_ID.fullmatch(generated.headers.get("x-request-id", "")), (method, path)
        given = f"probe-{n}"
        echoed = await client.request(
            method, path, json=body, headers={**headers, "X-Request-ID": given}
        )
        assert echoed.headers.get("x-request-id") == given, (method, path)


async def test_the_worker_logs_a_job_with_the_request_id_that_enqueued_it(
    client: httpx.AsyncClient, spawn_worker: SpawnWorker
) -> None:
    report = await client.post("/reports", json={}, headers={"X-Request-ID": "trace-report-1"})
    signup = await client.post(
        "/signup", json={"email": "trace@example.com"}, headers={"X-Request-ID": "trace-signup-1"}
    )
    expected = {
        report.json()["job_id"]: "trace-report-1",
        signup.json()["job_id"]: "trace-signup-1",
    }

    worker = await run_burst_worker(spawn_worker)

    lines = json_lines(worker)
    for job_id, request_id in expected.items():
        mine = [line for line in lines if line.get("job_id") == job_id]
        assert mine, worker.output()
        assert {line.get("correlation_id") for line in mine} == {request_id}, mine
        assert "job_started" in {line["event"] for line in mine}, mine
    signup_events = {
        line["event"] for line in lines if line.get("job_id") == signup.json()["job_id"]
    }
    assert "welcome_email_sent" in signup_events, worker.output()
