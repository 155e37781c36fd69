"""The sample service's HTTP routes, through the ASGI app on real PostgreSQL,
with real ``outbox-worker run --burst`` processes running the jobs the routes enqueue. Its
health, metrics and outage answers are in test_health.py."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from app.services import reports as reports_service
from outbox_worker import EnqueueError, Job, Outbox, get_job
from tests.conftest import WorkerProcess, wait_until

SpawnWorker = Callable[..., WorkerProcess]
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UUID_TEXT = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# --------------------------------------------------------------------------- helpers


async def run_burst_worker(spawn_worker: SpawnWorker) -> WorkerProcess:
    """One ``outbox-worker run app.tasks:registry --burst``, waited for; it must exit 0."""
    worker = spawn_worker("--burst", target="app.tasks:registry")
    code = await asyncio.to_thread(worker.wait, 90)
    assert code == 0, worker.output()
    return worker


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


def assert_json_detail(response: httpx.Response) -> Any:
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert isinstance(body, dict), body
    assert "detail" in body, body
    assert body["detail"], body
    return body["detail"]


async def table_counts(pool: asyncpg.Pool) -> dict[str, int]:
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM users) AS users,"
        " (SELECT count(*) FROM comments) AS comments,"
        " (SELECT count(*) FROM reports) AS reports,"
        " (SELECT count(*) FROM sent_emails) AS sent_emails,"
        " (SELECT count(*) FROM outbox_jobs) AS jobs"
    )
    return dict(row)


async def job_row(pool: asyncpg.Pool, job_id: int) -> dict[str, Any]:
    row = await pool.fetchrow(
        "SELECT id, task, queue, state, attempts, max_attempts, dedupe_key, correlation_id,"
        " args::text AS args FROM outbox_jobs WHERE id = $1",
        job_id,
    )
    assert row is not None, f"no job {job_id}"
    result = dict(row)
    result["args"] = json.loads(result["args"])
    return result


async def sign_up(client: httpx.AsyncClient, email: str, name: str | None = None) -> int:
    body: dict[str, Any] = {"email": email}
    if name is not None:
        body["name"] = name
    response = await client.post("/signup", json=body)
    assert response.status_code == 201, response.text
    user_id: int = response.json()["user_id"]
    return user_id


async def comment(client: httpx.AsyncClient, author: str, body: str) -> int:
    response = await client.post("/comments", json={"author": author, "body": body})
    assert response.status_code == 201, response.text
    comment_id: int = response.json()["id"]
    return comment_id


OnSent = Callable[[], Awaitable[None]]


@asynccontextmanager
async def probing_client(
    app: FastAPI, on_response_sent: OnSent, *, raise_app_exceptions: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose transport calls ``on_response_sent`` at the moment the app sends the
    last byte of a response body, i.e. when a real client would have the whole answer."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        async def watched_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await on_response_sent()

        await app(scope, receive, watched_send)

    transport = httpx.ASGITransport(app=asgi, raise_app_exceptions=raise_app_exceptions)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


# --------------------------------------------------------------------------- sign-up


async def test_signup_creates_user_and_job_then_a_worker_sends_one_email(
    client: httpx.AsyncClient, pool: asyncpg.Pool, spawn_worker: SpawnWorker
) -> None:
    response = await client.post("/signup", json={"email": "Ada@Example.com", "name": "Ada"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"user_id", "email", "job_id"}
    assert body["email"] == "ada@example.com"
    user_id, job_id = body["user_id"], body["job_id"]

    user = await pool.fetchrow("SELECT email, name FROM users WHERE id = $1", user_id)
    assert user is not None
    assert (user["email"], user["name"]) == ("ada@example.com", "Ada")
    job = await job_row(pool, job_id)
    assert job["task"] == "send_welcome_email"
    assert job["queue"] == "emails"
    assert job["args"] == {"user_id": user_id}
    assert job["max_attempts"] == 8
    assert job["dedupe_key"] == f"welcome:{user_id}"
    # Answered before any e-mail went out: the job waits for a worker.
    assert job["state"] == "queued"
    assert job["attempts"] == 0
    assert await pool.fetchval("SELECT count(*) FROM sent_emails") == 0

    await run_burst_worker(spawn_worker)

    job = await job_row(pool, job_id)
    assert job["state"] == "succeeded"
    assert job["attempts"] == 1
    emails = await pool.fetch("SELECT job_id, user_id, to_address, subject, body FROM sent_emails")
    assert len(emails) == 1
    email = emails[0]
    assert (email["job_id"], email["user_id"], email["to_address"]) == (
        job_id,
        user_id,
        "ada@example.com",
    )
    assert email["subject"] == "Welcome to pgoutbox"
    assert email["body"].startswith("Hello Ada,")


async def test_signup_without_a_name_greets_plainly(
    client: httpx.AsyncClient, pool: asyncpg.Pool, spawn_worker: SpawnWorker
) -> None:
    user_id = await sign_up(client, "noname@example.com")
    await run_burst_worker(spawn_worker)
    body = await pool.fetchval("SELECT body FROM sent_emails WHERE user_id = $1", user_id)
    assert body is not None
    assert body.startswith("Hello,\n")


async def test_a_rerun_welcome_job_does_not_send_a_second_email(
    client: httpx.AsyncClient, pool: asyncpg.Pool, spawn_worker: SpawnWorker
) -> None:
    response = await client.post("/signup", json={"email": "once@example.com"})
    assert response.status_code == 201, response.text
    user_id, job_id = response.json()["user_id"], response.json()["job_id"]

    await run_burst_worker(spawn_worker)
    # A second worker finds nothing to do.
    await run_burst_worker(spawn_worker)
    assert await pool.fetchval("SELECT count(*) FROM sent_emails WHERE user_id = $1", user_id) == 1

    # An operator (or a lost lease) makes the same job run again.
    await pool.execute(
        "UPDATE outbox_jobs SET state = 'queued', run_at = now(), finished_at = NULL WHERE id = $1",
        job_id,
    )
    await run_burst_worker(spawn_worker)

    job = await job_row(pool, job_id)
    assert job["state"] == "succeeded"
    assert job["attempts"] == 2, "the job really ran a second time"
    rows = await pool.fetch("SELECT job_id FROM sent_emails WHERE user_id = $1", user_id)
    assert [r["job_id"] for r in rows] == [job_id]


@pytest.mark.parametrize("second", ["taken@example.com", "TAKEN@EXAMPLE.COM", "Taken@example.com"])
async def test_a_taken_email_is_409_and_creates_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool, second: str
) -> None:
    first = await client.post("/signup", json={"email": "taken@example.com", "name": "First"})
    assert first.status_code == 201, first.text
    before = await table_counts(pool)

    response = await client.post("/signup", json={"email": second, "name": "Second"})

    assert response.status_code == 409, response.text
    detail = assert_json_detail(response)
    assert isinstance(detail, str)
    assert "registered" in detail
    assert "x-request-id" in response.headers
    assert await table_counts(pool) == before
    assert await pool.fetchval("SELECT name FROM users") == "First"
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 1


async def test_concurrent_signups_with_one_email_create_one_user_and_one_job(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    emails = ["race@example.com" if i % 2 else "RACE@example.com" for i in range(10)]
    responses = await asyncio.gather(
        *(client.post("/signup", json={"email": email}) for email in emails)
    )
    codes = sorted(r.status_code for r in responses)
    assert codes == [201] + [409] * 9, [r.text for r in responses]
    assert await pool.fetchval("SELECT count(*) FROM users") == 1
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 1


# --------------------------------------------------------------------------- reports


async def test_a_report_goes_from_queued_to_done_with_real_counts(
    client: httpx.AsyncClient, pool: asyncpg.Pool, spawn_worker: SpawnWorker
) -> None:
    for email in ("a@example.com", "b@example.com", "c@example.com"):
        await sign_up(client, email)
    comment_ids = [
        await comment(client, "alice", "first"),
        await comment(client, "bob", "second"),
        await comment(client, "alice", "third"),
        await comment(client, "alice", "x" * 300),
    ]

    response = await client.post("/reports", json={})
    assert response.status_code == 202, response.text
    queued = response.json()
    assert set(queued) == {"report_id", "job_id", "status"}
    assert queued["status"] == "queued"
    assert UUID_TEXT.fullmatch(queued["report_id"])
    report_id, job_id = queued["report_id"], queued["job_id"]
    job = await job_row(pool, job_id)
    assert (job["task"], job["queue"], job["state"]) == ("generate_report", "reports", "queued")
    assert job["args"] == {"report_id": report_id}
    assert job["dedupe_key"] == report_id

    before = await client.get(f"/reports/{report_id}")
    assert before.status_code == 200, before.text
    shown = before.json()
    assert shown["report_id"] == report_id
    assert shown["job_id"] == job_id
    assert shown["status"] == "queued"
    assert shown["params"] == {}
    assert shown["result"] is None
    assert shown["finished_at"] is None

    await run_burst_worker(spawn_worker)

    after = await client.get(f"/reports/{report_id}")
    assert after.status_code == 200, after.text
    done = after.json()
    assert done["status"] == "done"
    assert done["finished_at"] is not None
    result = done["result"]
    assert result["window"] == {"since": None, "until": None}
    assert result["total_users"] == 3
    assert result["new_users"] == 3
    assert result["total_comments"] == 4
    assert result["comments"] == 4
    assert result["active_authors"] == 2
    recent = result["recent_comments"]
    assert [c["id"] for c in recent] == sorted(comment_ids, reverse=True)
    assert [c["author"] for c in recent] == ["alice", "alice", "bob", "alice"]
    assert recent[0]["body"] == "x" * 200, "bodies are cut to 200 characters"
    assert recent[3]["body"] == "first"
    assert (await job_row(pool, job_id))["state"] == "succeeded"


async def test_a_report_window_counts_only_rows_inside_it(
    client: httpx.AsyncClient, pool: asyncpg.Pool, spawn_worker: SpawnWorker
) -> None:
    old_user = await sign_up(client, "old@example.com")
    inside_users = [
        await sign_up(client, "in1@example.com"),
        await sign_up(client, "in2@example.com"),
    ]
    await sign_up(client, "new@example.com")
    old_comment = await comment(client, "ann", "old")
    inside = [
        await comment(client, "ben", "in-a"),
        await comment(client, "cat", "in-b"),
        await comment(client, "ben", "in-c"),
    ]
    await comment(client, "dan", "new")
    await pool.execute(
        "UPDATE users SET created_at = '2020-05-01T00:00:00Z' WHERE id = $1", old_user
    )
    await pool.execute(
        "UPDATE users SET created_at = '2021-03-01T00:00:00Z' WHERE id = ANY($1::bigint[])",
        inside_users,
    )
    await pool.execute(
        "UPDATE comments SET created_at = '2020-05-01T00:00:00Z' WHERE id = $1", old_comment
    )
    for day, comment_id in enumerate(inside, start=1):
        await pool.execute(
            "UPDATE comments SET created_at = $2 WHERE id = $1",
            comment_id,
            datetime(2021, 3, day, 12, tzinfo=UTC),
        )

    window = {"since": "2021-01-01T00:00:00Z", "until": "2022-01-01T00:00:00+00:00"}
    response = await client.post("/reports", json={**window, "recent_limit": 2})
    assert response.status_code == 202, response.text
    report_id = response.json()["report_id"]

    await run_burst_worker(spawn_worker)

    done = (await client.get(f"/reports/{report_id}")).json()
    assert done["status"] == "done"
    assert done["params"] == {
        "since": "2021-01-01T00:00:00Z",
        "until": "2022-01-01T00:00:00Z",
        "recent_limit": 2,
    }
    result = done["result"]
    assert result["new_users"] == 2
    assert result["comments"] == 3
    assert result["active_authors"] == 2
    assert result["total_users"] == 4
    assert result["total_comments"] == 5
    assert [c["id"] for c in result["recent_comments"]] == [inside[2], inside[1]]


async def test_post_reports_without_any_body_is_valid(
    client: httpx.AsyncClient, pool: asyncpg.Pool, spawn_worker: SpawnWorker
) -> None:
    response = await client.post("/reports")
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued"
    assert await pool.fetchval("SELECT count(*) FROM reports") == 1
    shown = (await client.get(f"/reports/{body['report_id']}")).json()
    assert shown["params"] == {}
    await run_burst_worker(spawn_worker)
    done = (await client.get(f"/reports/{body['report_id']}")).json()
    assert done["status"] == "done"
    assert done["result"]["total_users"] == 0


async def test_the_widest_windows_a_report_accepts_are_ones_its_job_computes(
    client: httpx.AsyncClient, spawn_worker: SpawnWorker
) -> None:
    """The edges of what POST /reports takes (year 1 to 9999, in UTC, whatever the offset)
    all run: a window the job could not compute is refused with 422 instead."""
    await comment(client, "ann", "inside every window")
    windows = [
        {"since": "0001-01-01T00:00:00Z", "until": "9999-12-31T23:59:59.999999Z"},
        {"since": "0001-01-01T01:00:00+01:00", "until": "9999-12-31T18:59:59.999999-05:00"},
        {"since": "0001-01-01T00:00:00-23:59", "until": "9999-12-31T23:59:59.999999+23:59"},
    ]
    report_ids = []
    for window in windows:
        response = await client.post("/reports", json=window)
        assert response.status_code == 202, response.text
        report_ids.append(response.json()["report_id"])

    await run_burst_worker(spawn_worker)

    for report_id in report_ids:
        done = (await client.get(f"/reports/{report_id}")).json()
        assert done["status"] == "done", done
        assert done["result"]["comments"] == 1


async def test_a_report_shows_failed_when_its_job_is_dead(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    body = (await client.post("/reports", json={})).json()
    await pool.execute("UPDATE outbox_jobs SET state = 'dead' WHERE id = $1", body["job_id"])
    shown = (await client.get(f"/reports/{body['report_id']}")).json()
    assert shown["status"] == "failed"
    assert shown["result"] is None


async def test_a_report_read_while_its_worker_finishes_is_not_a_500(
    app: FastAPI,
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    spawn_worker: SpawnWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GET /reports/{id} reads the report, then its job. A real worker that completes the
    report between those two reads (report 'done' and job 'succeeded' commit together) must
    give a 200 with some status, not a server error."""
    body = (await client.post("/reports", json={})).json()
    real_get_job = get_job
    finished: list[int] = []

    async def worker_finishes_between_reads(session: Any, job_id: int) -> Job | None:
        if not finished:
            await run_burst_worker(spawn_worker)
            finished.append(job_id)
        job: Job | None = await real_get_job(session, job_id)
        return job

    monkeypatch.setattr(reports_service, "get_job", worker_finishes_between_reads)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as raw:
        response = await raw.get(f"/reports/{body['report_id']}")

    assert finished == [body["job_id"]]
    assert await pool.fetchval("SELECT status FROM reports") == "done"
    assert response.status_code == 200, response.text
    assert response.json()["status"] in {"queued", "running", "done"}


async def test_a_report_whose_dead_job_was_pruned_does_not_claim_to_be_queued(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """Retention deletes dead jobs (OUTBOX_RETENTION_DEAD); the report will never run, so it
    must not go on saying 'queued'."""
    body = (await client.post("/reports", json={})).json()
    await pool.execute(
        "UPDATE outbox_jobs SET state = 'dead', finished_at = now(), last_error = 'gave up'"
        " WHERE id = $1",
        body["job_id"],
    )
    assert (await client.get(f"/reports/{body['report_id']}")).json()["status"] == "failed"
    # What the pruner does once the retention has passed.
    await pool.execute("DELETE FROM outbox_jobs WHERE id = $1 AND state = 'dead'", body["job_id"])

    response = await client.get(f"/reports/{body['report_id']}")

    assert response.status_code == 200, response.text
    assert response.json()["status"] not in {"queued", "running"}


# --------------------------------------------------------------------------- Idempotency-Key


async def test_the_same_idempotency_key_returns_the_first_report_and_job(
    client: httpx.AsyncClient, pool: asyncpg.Pool, spawn_worker: SpawnWorker
) -> None:
    headers = {"Idempotency-Key": "order-42:report"}
    first = await client.post("/reports", json={}, headers=headers)
    second = await client.post("/reports", json={}, headers=headers)
    # No body means the same as {}.
    third = await client.post("/reports", headers=headers)

    assert first.status_code == 202, first.text
    for repeat in (second, third):
        assert repeat.status_code == first.status_code
        assert repeat.content == first.content
        assert repeat.headers["content-type"] == first.headers["content-type"]
    assert await pool.fetchval("SELECT count(*) FROM reports") == 1
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 1
    assert await pool.fetchval("SELECT idempotency_key FROM reports") == "order-42:report"

    # Still the first answer once the report is done.
    await run_burst_worker(spawn_worker)
    later = await client.post("/reports", json={}, headers=headers)
    assert (later.status_code, later.content) == (first.status_code, first.content)
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 1

    # Another key is another report.
    other = await client.post("/reports", json={}, headers={"Idempotency-Key": "other"})
    assert other.status_code == 202
    assert other.json()["report_id"] != first.json()["report_id"]
    assert await pool.fetchval("SELECT count(*) FROM reports") == 2


async def test_concurrent_requests_with_one_key_create_one_report_and_one_job(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    headers = {"Idempotency-Key": "burst-of-ten"}
    body = {"since": "2020-01-01T00:00:00Z"}
    responses = await asyncio.gather(
        *(client.post("/reports", json=body, headers=headers) for _ in range(10))
    )
    assert {r.status_code for r in responses} == {202}, [r.text for r in responses]
    assert len({r.content for r in responses}) == 1, [r.text for r in responses]
    assert await pool.fetchval("SELECT count(*) FROM reports") == 1
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 1
    row = await pool.fetchrow("SELECT id, job_id FROM reports")
    assert responses[0].json() == {
        "report_id": str(row["id"]),
        "job_id": row["job_id"],
        "status": "queued",
    }


async def test_the_same_key_with_a_different_body_is_422(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    headers = {"Idempotency-Key": "reused"}
    first = await client.post("/reports", json={}, headers=headers)
    assert first.status_code == 202
    response = await client.post("/reports", json={"recent_limit": 3}, headers=headers)
    assert response.status_code == 422, response.text
    detail = assert_json_detail(response)
    assert "Idempotency-Key" in detail
    assert await pool.fetchval("SELECT count(*) FROM reports") == 1
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 1


@pytest.mark.parametrize(
    "key",
    ["k" * 256, "k" * 300, "has space", "tab\there", "", "ctl\x7fchar"],
    ids=["256-chars", "300-chars", "space", "tab", "empty", "del"],
)
async def test_a_bad_idempotency_key_is_400(
    client: httpx.AsyncClient, pool: asyncpg.Pool, key: str
) -> None:
    response = await client.post("/reports", json={}, headers={"Idempotency-Key": key})
    assert response.status_code == 400, response.text
    assert "Idempotency-Key" in assert_json_detail(response)
    assert await pool.fetchval("SELECT count(*) FROM reports") == 0
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 0


async def test_the_longest_and_oddest_valid_keys_are_accepted(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    for key in ("k" * 255, "~!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}", "1"):
        response = await client.post("/reports", json={}, headers={"Idempotency-Key": key})
        assert response.status_code == 202, (key, response.text)
    keys = await pool.fetch("SELECT idempotency_key FROM reports")
    assert {r["idempotency_key"] for r in keys} == {
        "k" * 255,
        "~!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}",
        "1",
    }


# --------------------------------------------------------------------------- X-Request-ID


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


# --------------------------------------------------------------------------- bad input

BAD_INPUT: list[tuple[str, str, dict[str, Any], int]] = [
    ("POST", "/signup", {"content": b'{"email": "a@example.com"'}, 422),
    ("POST", "/signup", {"content": b"not json at all"}, 422),
    ("POST", "/signup", {"json": {"email": 5}}, 422),
    ("POST", "/signup", {"json": {"email": "a@example.com", "name": 7}}, 422),
    ("POST", "/signup", {"json": {"email": "a@example.com", "admin": True}}, 422),
    ("POST", "/signup", {"json": {"email": "not-an-email"}}, 422),
    ("POST", "/signup", {"json": {"email": "a@"}}, 422),
    ("POST", "/signup", {"json": {}}, 422),
    ("POST", "/signup", {"json": ["a@example.com"]}, 422),
    ("POST", "/signup", {"json": {"email": "a@example.com", "name": "n" * 201}}, 422),
    ("POST", "/reports", {"content": b"{"}, 422),
    ("POST", "/reports", {"json": {"recent_limit": "many"}}, 422),
    ("POST", "/reports", {"json": {"recent_limit": 101}}, 422),
    ("POST", "/reports", {"json": {"recent_limit": -1}}, 422),
    ("POST", "/reports", {"json": {"format": "pdf"}}, 422),
    ("POST", "/reports", {"json": [1, 2]}, 422),
    ("POST", "/reports", {"json": "{}"}, 422),
    (
        "POST",
        "/reports",
        {"json": {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}},
        422,
    ),
    (
        "POST",
        "/reports",
        {"json": {"since": "2026-01-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}},
        422,
    ),
    ("POST", "/reports", {"json": {"since": "2026-01-01T00:00:00"}}, 422),
    ("POST", "/reports", {"json": {"until": "2026-01-01T00:00:00"}}, 422),
    (
        "POST",
        "/reports",
        {"json": {"since": "2026-01-01T00:00:00", "until": "2026-02-01T00:00:00Z"}},
        422,
    ),
    ("POST", "/reports", {"json": {"until": "yesterday"}}, 422),
    # Moments before year 1 or after 9999 in UTC, which the report job cannot pass on.
    ("POST", "/reports", {"json": {"since": "0001-01-01T00:59:59.999999+01:00"}}, 422),
    ("POST", "/reports", {"json": {"until": "0001-01-01T00:30:00+00:31"}}, 422),
    ("POST", "/reports", {"json": {"until": "9999-12-31T23:00:00-01:00"}}, 422),
    (
        "POST",
        "/reports",
        {"json": {"since": "2026-01-01T00:00:00Z", "until": "9999-12-31T20:00:00-05:00"}},
        422,
    ),
    # Text PostgreSQL cannot store (NUL, unpaired surrogates), and a 422 that must not echo
    # a surrogate back (it cannot be encoded).
    ("POST", "/comments", {"content": rb'{"author": "a\u0000b", "body": "x"}'}, 422),
    ("POST", "/comments", {"content": rb'{"author": "a", "body": "x\u0000"}'}, 422),
    ("POST", "/comments", {"content": rb'{"author": "\ud800", "body": "x"}'}, 422),
    ("POST", "/comments", {"content": rb'{"author": "a", "body": "\udfffx\ud800"}'}, 422),
    ("POST", "/comments", {"content": rb'{"author": "a", "body": "b", "\ud800": 1}'}, 422),
    ("POST", "/comments", {"content": rb'{"author": ["\ud800"], "body": "b"}'}, 422),
    ("POST", "/signup", {"content": rb'{"email": "a@example.com", "name": "A\u0000"}'}, 422),
    ("POST", "/signup", {"content": rb'{"email": "a@example.com", "name": "\udbff"}'}, 422),
    ("POST", "/signup", {"content": rb'{"email": "a\u0000@example.com"}'}, 422),
    ("POST", "/signup", {"content": rb'{"email": "\ud800@example.com"}'}, 422),
    ("POST", "/reports", {"content": rb'{"since": "\ud800"}'}, 422),
    ("POST", "/comments", {"json": {"author": "", "body": "b"}}, 422),
    ("POST", "/comments", {"json": {"author": "a"}}, 422),
    ("POST", "/comments", {"json": {"author": "a", "body": "b", "likes": 1}}, 422),
    ("POST", "/comments", {"content": b"author=a&body=b"}, 422),
    ("GET", f"/reports/{uuid.UUID(int=0)}", {}, 404),
    ("GET", "/reports/not-a-uuid", {}, 422),
    ("GET", "/reports/12345", {}, 422),
]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    BAD_INPUT,
    ids=[f"{m} {p} {k}"[:80] for m, p, k, _ in BAD_INPUT],
)
async def test_bad_input_is_a_4xx_with_a_json_detail_and_writes_nothing(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
) -> None:
    headers = {"Content-Type": "application/json"} if "content" in kwargs else {}
    response = await client.request(method, path, headers=headers, **kwargs)
    assert response.status_code == status, response.text
    assert_json_detail(response)
    assert "x-request-id" in response.headers
    assert await table_counts(pool) == {
        "users": 0,
        "comments": 0,
        "reports": 0,
        "sent_emails": 0,
        "jobs": 0,
    }


UNSTORABLE_TEXT = [
    pytest.param(
        "/comments", rb'{"author": "a\u0000b", "body": "x"}', "author", "NUL", id="nul-author"
    ),
    pytest.param(
        "/comments", rb'{"author": "a", "body": "\ud800"}', "body", "unicode", id="lone-body"
    ),
    pytest.param(
        "/signup",
        rb'{"email": "ann@example.com", "name": "Ann\udfff"}',
        "name",
        "unicode",
        id="lone-name",
    ),
]


@pytest.mark.parametrize(("path", "raw", "field", "word"), UNSTORABLE_TEXT)
async def test_text_the_database_cannot_store_is_a_422_that_names_the_field(
    client: httpx.AsyncClient, path: str, raw: bytes, field: str, word: str
) -> None:
    response = await client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    [error] = assert_json_detail(response)
    assert error["loc"] == ["body", field]
    assert word in error["msg"]
    assert "input" not in error


# Bodies whose default 422 echoed them back: unencodable (a 500 instead), or as big as the
# body itself (a 2.7 MB body of 200,000 unknown keys answered 20 MB).
UNECHOABLE = [
    pytest.param(rb'{"author": "a", "body": "b", "\ud800": 1}', id="lone-surrogate-key"),
    pytest.param(rb'{"author": ["\udfff"], "body": "b"}', id="lone-surrogate-input"),
    pytest.param(
        b'{"author": "a", "body": "b", "' + b"k" * 200_000 + b'": 1}', id="200-kB-unknown-key"
    ),
    pytest.param(json.dumps({f"k{n}": n for n in range(60_000)}).encode(), id="60000-unknown-keys"),
    pytest.param(
        json.dumps([{"author": n} for n in range(20_000)]).encode(), id="a-20000-item-list"
    ),
]


@pytest.mark.parametrize("raw", UNECHOABLE)
async def test_a_422_lists_a_few_errors_and_never_echoes_the_input(
    client: httpx.AsyncClient, raw: bytes
) -> None:
    assert len(raw) < 1024 * 1024  # under the body limit: these reach validation
    response = await client.post(
        "/comments", content=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text[:500]
    detail = assert_json_detail(response)
    assert len(response.content) < 4096, len(response.content)
    assert 1 <= len(detail) <= 11
    for error in detail:
        assert set(error) <= {"type", "loc", "msg", "ctx"}, error
        assert isinstance(error["msg"], str)


# --------------------------------------------------------------------------- body size

LIMIT = 1000
MiB = 1024 * 1024


class PulledBody:
    """A request body handed to the app one chunk at a time, as it asks, counting the bytes
    it took: what a server holds in memory for the app."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.pulled += len(chunk)
            yield chunk


@pytest.fixture
def small_limit(app: FastAPI) -> int:
    app.state.settings.max_body_bytes = LIMIT
    return LIMIT


BODY_ROUTES = [
    ("/comments", "application/json"),
    ("/signup", "application/json"),
    ("/reports", "application/json"),
    ("/dashboard/login", "application/x-www-form-urlencoded"),
]


@pytest.mark.parametrize(("path", "content_type"), BODY_ROUTES)
@pytest.mark.parametrize(
    "declared", [None, "10", str(50 * MiB)], ids=["chunked", "length-that-lies", "length"]
)
async def test_a_body_over_the_limit_is_a_413_read_no_further_than_the_limit(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    small_limit: int,
    path: str,
    content_type: str,
    declared: str | None,
) -> None:
    body = PulledBody(b"x" * 512 for _ in range(100_000))  # 50 MiB, if it were all read
    headers = {"Content-Type": content_type}
    if declared is not None:
        headers["Content-Length"] = declared
    response = await client.post(path, content=body, headers=headers)
    assert response.status_code == 413, response.text
    assert f"{small_limit} bytes" in assert_json_detail(response)
    assert "x-request-id" in response.headers
    if declared == str(50 * MiB):
        assert body.pulled == 0, "refused on its Content-Length, before reading"
    else:
        assert body.pulled <= small_limit + 512
    assert set((await table_counts(pool)).values()) == {0}


async def test_a_body_exactly_at_the_limit_is_read_whole(
    client: httpx.AsyncClient, small_limit: int
) -> None:
    prefix, suffix = b'{"author": "a", "body": "', b'"}'
    raw = prefix + b"x" * (small_limit - len(prefix) - len(suffix)) + suffix
    assert len(raw) == small_limit
    body = PulledBody(raw[n : n + 100] for n in range(0, len(raw), 100))
    response = await client.post(
        "/comments", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 201, response.text
    assert body.pulled == small_limit


async def test_the_default_body_limit_is_one_mebibyte(client: httpx.AsyncClient) -> None:
    body = PulledBody(b"x" for _ in range(MiB + 1))
    response = await client.post(
        "/comments",
        content=body,
        headers={"Content-Type": "application/json", "Content-Length": str(MiB + 1)},
    )
    assert response.status_code == 413, response.text
    assert f"{MiB} bytes" in assert_json_detail(response)


async def test_an_unknown_report_names_it_in_the_detail(client: httpx.AsyncClient) -> None:
    missing = uuid.uuid4()
    response = await client.get(f"/reports/{missing}")
    assert response.status_code == 404
    assert str(missing) in assert_json_detail(response)


# --------------------------------------------------------------------------- comments


async def test_a_comment_is_saved_and_subscribers_are_notified_after_the_response(
    app: FastAPI, pool: asyncpg.Pool
) -> None:
    notified_when_sent: list[list[int]] = []

    async def on_sent() -> None:
        notified_when_sent.append(list(app.state.notifier.sent))

    async with probing_client(app, on_sent) as client:
        response = await client.post("/comments", json={"author": "ann", "body": "hello"})

    assert response.status_code == 201, response.text
    body = response.json()
    assert body == {"id": body["id"], "author": "ann", "body": "hello"}
    row = await pool.fetchrow("SELECT author, body FROM comments WHERE id = $1", body["id"])
    assert row is not None
    assert (row["author"], row["body"]) == ("ann", "hello")
    # Nobody had been notified when the response went out; afterwards, exactly once.
    assert notified_when_sent == [[]]

    async def notified() -> bool:
        return bool(app.state.notifier.sent == [body["id"]])

    await wait_until(notified, timeout=10, what="the subscriber notification")
    # A comment is not a job.
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 0


async def test_subscribers_are_notified_of_a_comment_that_is_already_committed(
    app: FastAPI, client: httpx.AsyncClient, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The notification is fire-and-forget after the response; by then the comment must be
    in the database, or subscribers hear of a comment they cannot read (and a rolled-back
    comment would still be announced)."""
    notifier = app.state.notifier
    real_notify = notifier.notify
    visible: list[int] = []

    async def notify_and_look(comment_id: int, author: str) -> None:
        visible.append(
            await pool.fetchval("SELECT count(*) FROM comments WHERE id = $1", comment_id)
        )
        await real_notify(comment_id, author)

    monkeypatch.setattr(notifier, "notify", notify_and_look)
    response = await client.post("/comments", json={"author": "ann", "body": "hi"})
    assert response.status_code == 201

    async def notified() -> bool:
        return bool(visible)

    await wait_until(notified, timeout=10, what="the subscriber notification")
    assert notifier.sent == [response.json()["id"]]
    assert visible == [1], "subscribers were notified before the comment was committed"


# --------------------------------------------------------------------------- atomicity

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
