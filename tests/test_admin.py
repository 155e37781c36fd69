"""The admin service through its HTTP face, the JSON routes of
``outbox_worker.web.create_admin_router`` on the library's own host (``admin_host``): the
token, listing and filters, retry and cancel (of a running job too), jobs no reader takes
whole, the CLI's --json against the API's answers, no-store, and the database away. The
sample service's health, metrics and backpressure answers are in tests/sample/."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from outbox_worker import enqueue, sql
from outbox_worker.config import asyncpg_dsn, sqlalchemy_url
from outbox_worker.db import is_database_unavailable
from outbox_worker.devdb import PostgresServer
from outbox_worker.jobs import MAX_JSON_DEPTH, TOO_DEEP
from outbox_worker.web import create_admin_router
from outbox_worker.web.auth import COOKIE, cookie_value
from outbox_worker.web.router import RETRY_AFTER_SECONDS
from tests.conftest import WorkerProcess, deep_json, levels, wait_until

TOKEN = "s3cret-admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def admin_app(admin_host: FastAPI) -> FastAPI:
    """The admin host with admin on: its token set."""
    admin_host.state.admin_token = TOKEN
    return admin_host


async def insert_job(pool: asyncpg.Pool, task: str = "echo", **columns: object) -> int:
    names = ["task", *columns]
    values = [task, *columns.values()]
    placeholders = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    job_id: int = await pool.fetchval(
        f"INSERT INTO outbox_jobs ({', '.join(names)}) VALUES ({placeholders}) RETURNING id",
        *values,
    )
    return job_id


async def test_admin_routes_are_refused_without_a_configured_token(
    admin_client: httpx.AsyncClient,
) -> None:
    for method, path in [
        ("GET", "/jobs"),
        ("GET", "/jobs/1"),
        ("POST", "/jobs/1/retry"),
        ("POST", "/jobs/1/cancel"),
        ("GET", "/queues"),
    ]:
        response = await admin_client.request(method, path, headers=AUTH)
        assert response.status_code == 403, (path, response.text)
        assert "OUTBOX_ADMIN_TOKEN" in response.json()["detail"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-of-some-length"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
)
async def test_a_missing_or_wrong_token_is_401(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await admin_client.get("/jobs", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "token" in response.json()["detail"]


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


async def test_retry_and_cancel_follow_the_state_machine(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    dead = await insert_job(
        pool, "echo", state="dead", attempts=5, max_attempts=5, last_error="boom"
    )
    done = await insert_job(pool, "echo", state="succeeded", attempts=1)
    queued = await insert_job(pool, "echo")

    retried = (await admin_client.post(f"/jobs/{dead}/retry", headers=AUTH)).json()
    assert (retried["state"], retried["attempts"], retried["max_attempts"]) == ("queued", 5, 6)
    assert retried["last_error"] == "boom"  # history is kept
    refused = await admin_client.post(f"/jobs/{done}/retry", headers=AUTH)
    assert refused.status_code == 409
    assert "succeeded" in refused.json()["detail"]

    cancelled = (await admin_client.post(f"/jobs/{queued}/cancel", headers=AUTH)).json()
    assert cancelled["state"] == "cancelled"
    assert cancelled["finished_at"] is not None
    again = await admin_client.post(f"/jobs/{queued}/cancel", headers=AUTH)
    assert again.status_code == 409
    finished = await admin_client.post(f"/jobs/{done}/cancel", headers=AUTH)
    assert finished.status_code == 409
    # A cancelled job may be retried.
    assert (await admin_client.post(f"/jobs/{queued}/retry", headers=AUTH)).json()[
        "state"
    ] == "queued"
    rows = {r["id"]: r["state"] for r in await pool.fetch("SELECT id, state FROM outbox_jobs")}
    assert rows == {dead: "queued", done: "succeeded", queued: "queued"}


async def test_bulk_retry_of_dead_jobs_by_filter(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    echo_dead = [
        await insert_job(pool, "echo", state="dead", attempts=1, max_attempts=1) for _ in range(3)
    ]
    noop_dead = await insert_job(pool, "noop", state="dead", attempts=1, max_attempts=1)
    response = await admin_client.post("/jobs/retry-dead", params={"task": "echo"}, headers=AUTH)
    assert sorted(response.json()["retried"]) == echo_dead
    states = {r["id"]: r["state"] for r in await pool.fetch("SELECT id, state FROM outbox_jobs")}
    assert states == {**dict.fromkeys(echo_dead, "queued"), noop_dead: "dead"}


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


async def test_cancel_of_a_running_job_stops_its_handler(
    admin_app: FastAPI,
    admin_client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    job_id = await insert_job(pool, "sleepy", queue="slow", args=json.dumps({"seconds": 60}))
    worker = spawn_worker("--lease-seconds", "1.5")
    await wait_until(
        lambda: pool.fetchval(
            "SELECT count(*) FROM test_executions WHERE job_id = $1 AND event = 'start'", job_id
        ),
        what="the job to start",
    )
    asked = (await admin_client.post(f"/jobs/{job_id}/cancel", headers=AUTH)).json()
    assert asked["state"] == "running"
    assert asked["cancel_requested_at"] is not None
    await wait_until(
        lambda: pool.fetchval("SELECT state = 'cancelled' FROM outbox_jobs WHERE id = $1", job_id),
        what="the worker to cancel the job",
    )
    row = await pool.fetchrow(
        "SELECT locked_by, finished_at FROM outbox_jobs WHERE id = $1", job_id
    )
    assert row["locked_by"] is None
    assert row["finished_at"] is not None
    events = [
        r["event"]
        for r in await pool.fetch(
            "SELECT event FROM test_executions WHERE job_id = $1 ORDER BY seq", job_id
        )
    ]
    assert events == ["start"]  # stopped, never reached its end
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert '"job_cancelled"' in worker.output()


async def test_json_routes_take_the_bearer_token_not_the_dashboard_cookie(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    job_id = await insert_job(pool, "echo")
    admin_client.cookies.set(COOKIE, cookie_value(TOKEN))
    response = await admin_client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 401
    assert await pool.fetchval("SELECT state FROM outbox_jobs WHERE id = $1", job_id) == "queued"


@pytest.mark.parametrize("leaves_by", ["fail", "release", "rescue"])
async def test_a_requested_cancel_wins_however_the_attempt_ends(
    pool: asyncpg.Pool, leaves_by: str
) -> None:
    job_id = await insert_job(pool, "echo")
    [claimed] = await pool.fetch(sql.JOB_CLAIM, ["default"], 1, "w1", 30.0)
    await pool.execute("UPDATE outbox_jobs SET cancel_requested_at = now() WHERE id = $1", job_id)
    if leaves_by == "fail":
        await pool.fetch(sql.JOB_FAIL_MANY, [job_id], [1], ["boom"], [0.0], [False], "w1")
    elif leaves_by == "release":
        await pool.fetch(sql.JOB_RELEASE_MANY, [job_id], [1], "w1")
    else:
        await pool.execute("UPDATE outbox_jobs SET locked_until = now() - interval '1 second'")
        await pool.fetch(sql.JOB_RESCUE_EXPIRED, 10)
    row = await pool.fetchrow("SELECT state, finished_at, locked_by FROM outbox_jobs")
    assert claimed["id"] == job_id
    assert row["state"] == "cancelled"
    assert row["finished_at"] is not None
    assert row["locked_by"] is None


async def test_retry_of_dead_jobs_forgets_an_old_cancel_request(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    job_id = await insert_job(pool, "echo", state="dead", attempts=1, max_attempts=1)
    await pool.execute("UPDATE outbox_jobs SET cancel_requested_at = now()")
    assert (await admin_client.post("/jobs/retry-dead", headers=AUTH)).json()["retried"] == [job_id]
    assert await pool.fetchval("SELECT cancel_requested_at FROM outbox_jobs") is None


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


# ---------------------------------------------------------------------------------------------
# Jobs carrying more than Python's JSON readers take: shown with markers, never a 500
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 300, 1000, 5000])
async def test_jobs_nested_deeper_than_readers_go_list_show_retry_and_cancel(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool, depth: int
) -> None:
    """Plain SQL stores what jsonb takes (thousands of levels); every answer cuts it to
    MAX_JSON_DEPTH levels and says so, and the job can still be retried and cancelled."""
    job_id = await insert_job(
        pool, "echo", args=deep_json(depth), result=deep_json(depth), state="dead", attempts=1
    )
    cut = (MAX_JSON_DEPTH, TOO_DEEP)

    listed = await admin_client.get("/jobs", headers=AUTH)
    assert listed.status_code == 200, listed.text[:300]
    [item] = listed.json()["items"]
    assert (levels(item["args"]), levels(item["result"])) == (cut, cut)
    shown = await admin_client.get(f"/jobs/{job_id}", headers=AUTH)
    assert shown.status_code == 200, shown.text[:300]
    assert levels(shown.json()["args"]) == cut

    retried = await admin_client.post(f"/jobs/{job_id}/retry", headers=AUTH)
    assert retried.status_code == 200, retried.text[:300]
    assert (retried.json()["state"], levels(retried.json()["args"])) == ("queued", cut)
    cancelled = await admin_client.post(f"/jobs/{job_id}/cancel", headers=AUTH)
    assert cancelled.status_code == 200, cancelled.text[:300]
    assert cancelled.json()["state"] == "cancelled"
    # Only the answers are cut: the row keeps what was written.
    stored = await pool.fetchval("SELECT args::text FROM outbox_jobs WHERE id = $1", job_id)
    assert stored == deep_json(depth)


async def test_args_as_deep_as_enqueue_takes_come_back_whole(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    args = json.loads(deep_json(MAX_JSON_DEPTH))
    async with engine.begin() as conn:
        job = await enqueue(conn, "echo", args)
    shown = await admin_client.get(f"/jobs/{job.id}", headers=AUTH)
    assert shown.status_code == 200, shown.text[:300]
    assert shown.json()["args"] == args
    assert levels(shown.json()["args"]) == (MAX_JSON_DEPTH, [])


async def test_numbers_longer_than_python_reads_are_shown_as_markers(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    job_id = await insert_job(
        pool, "echo", args='{"big": 1e5000, "fine": 10, "small": 1e-5000}', result="-1e5000"
    )
    shown = await admin_client.get(f"/jobs/{job_id}", headers=AUTH)
    assert shown.status_code == 200, shown.text[:300]
    body = shown.json()
    assert body["args"]["big"] == "(integer of 5001 digits: not shown)"
    assert (body["args"]["fine"], body["args"]["small"]) == (10, 0.0)
    assert body["result"] == "(integer of 5001 digits: not shown)"
    assert (await admin_client.get("/jobs", headers=AUTH)).status_code == 200


# ---------------------------------------------------------------------------------------------
# One JSON form of a job: the API's answers and the CLI's --json
# ---------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def cli_json(database_url: str, *args: str) -> Any:
    """``python -m outbox_worker … --json`` on this database, as an operator's script runs it."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("DATABASE_URL", "OUTBOX_DATABASE_URL") and not name.startswith("OUTBOX_")
    }
    result = subprocess.run(
        [sys.executable, "-m", "outbox_worker", *args, "--json"],
        env=env | {"PYTHONPATH": str(ROOT), "DATABASE_URL": database_url},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    return json.loads(result.stdout)


async def test_the_cli_shows_a_job_as_the_api_answers_it(
    admin_app: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool, database_url: str
) -> None:
    """``jobs show --json`` and ``GET /jobs/{id}`` give the same object, key for key (times
    end in Z in both), and so do ``jobs list --json`` and ``GET /jobs``."""
    job_id = await insert_job(
        pool,
        "send_email",
        queue="mail",
        state="dead",
        attempts=3,
        max_attempts=3,
        priority=-2,
        args=json.dumps({"to": "ada@example.com", "n": 1.5, "tags": ["é", None], "big": 2**70}),
        result=json.dumps({"sent": False}),
        last_error="ConnectionError: refused\n  at line 2",
        dedupe_key="mail-1",
        correlation_id="req-1",
        run_at=datetime(2024, 5, 1, 12, 30, 5, tzinfo=UTC),  # no fraction of a second
        started_at=datetime(2024, 5, 1, 12, 30, 6, 250000, tzinfo=UTC),
        finished_at=datetime(2024, 5, 1, 12, 30, 7, 123456, tzinfo=UTC),
        cancel_requested_at=datetime(2024, 5, 1, 12, 30, 6, 500000, tzinfo=UTC),
    )
    await insert_job(pool, "echo")  # a second job, with its nulls, for the lists

    api = (await admin_client.get(f"/jobs/{job_id}", headers=AUTH)).json()
    shown = await asyncio.to_thread(cli_json, database_url, "jobs", "show", str(job_id))

    assert shown == api
    assert (api["run_at"], api["finished_at"]) == (
        "2024-05-01T12:30:05Z",
        "2024-05-01T12:30:07.123456Z",
    )
    listed = await asyncio.to_thread(cli_json, database_url, "jobs", "list")
    assert listed == (await admin_client.get("/jobs", headers=AUTH)).json()
    assert len(listed["items"]) == 2


# ---------------------------------------------------------------------------------------------
# Caching: no admin answer may be kept by a browser or a proxy
# ---------------------------------------------------------------------------------------------


async def own_validation_answer(_: Request, exc: RequestValidationError) -> JSONResponse:
    """An app's own answer to invalid requests, shaped its own way as the sample's is: the
    admin routes answer with it, and add no-store to it."""
    detail = [{"loc": list(error["loc"]), "msg": error["msg"]} for error in exc.errors()]
    return JSONResponse({"detail": detail, "answered_by": "the app"}, status_code=422)


@pytest.mark.parametrize("invalid_requests", ["fastapis-answer", "the-apps-own-answer"])
async def test_every_admin_answer_says_no_store(
    admin_host: FastAPI, admin_client: httpx.AsyncClient, pool: asyncpg.Pool, invalid_requests: str
) -> None:
    if invalid_requests == "the-apps-own-answer":
        admin_host.exception_handler(RequestValidationError)(own_validation_answer)
    dead = await insert_job(pool, "echo", state="dead", attempts=1, max_attempts=1)
    queued = await insert_job(pool, "echo")
    done = await insert_job(pool, "echo", state="succeeded", attempts=1)
    disabled = await admin_client.get("/jobs", headers=AUTH)
    admin_host.state.admin_token = TOKEN
    answers = [
        (disabled, 403),
        (await admin_client.get("/jobs"), 401),
        (await admin_client.get("/jobs", headers=AUTH), 200),
        (await admin_client.get("/jobs", params={"state": "bogus"}, headers=AUTH), 422),
        (await admin_client.get("/jobs", params={"limit": 0}, headers=AUTH), 422),
        (await admin_client.get(f"/jobs/{queued}", headers=AUTH), 200),
        (await admin_client.get("/jobs/999", headers=AUTH), 404),
        (await admin_client.get("/jobs/abc", headers=AUTH), 422),
        (await admin_client.post(f"/jobs/{dead}/retry", headers=AUTH), 200),
        (await admin_client.post(f"/jobs/{done}/retry", headers=AUTH), 409),
        (await admin_client.post(f"/jobs/{queued}/cancel", headers=AUTH), 200),
        (await admin_client.post("/jobs/retry-dead", headers=AUTH), 200),
        (await admin_client.get("/queues", headers=AUTH), 200),
        (await admin_client.get("/queues", params={"window_seconds": 0}, headers=AUTH), 422),
    ]
    for response, status in answers:
        where = f"{response.request.method} {response.request.url}"
        assert response.status_code == status, (where, response.text)
        assert response.headers.get("cache-control") == "no-store", where
        if status >= 400:
            assert response.json()["detail"], where
    # Validation errors keep their shape: FastAPI's, or the app's own.
    invalid = answers[4][0].json()
    assert invalid["detail"][0]["loc"] == ["query", "limit"]
    assert ("answered_by" in invalid) == (invalid_requests == "the-apps-own-answer")


# ---------------------------------------------------------------------------------------------
# The database down: 503 with Retry-After, not 500
# ---------------------------------------------------------------------------------------------

UNREACHABLE_URL = "postgresql+asyncpg://nobody@127.0.0.1:1/nothing"


async def test_admin_routes_answer_503_when_the_database_is_unreachable() -> None:
    """The router alone (no handler installed by the app) says the database is away."""
    engine = create_async_engine(UNREACHABLE_URL)

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with AsyncSession(engine) as session, session.begin():
            yield session

    bare = FastAPI()
    bare.include_router(create_admin_router(get_session=get_session, admin_token=TOKEN))
    transport = httpx.ASGITransport(app=bare)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            for method, path in [
                ("GET", "/jobs"),
                ("GET", "/jobs/1"),
                ("POST", "/jobs/1/retry"),
                ("POST", "/jobs/1/cancel"),
                ("POST", "/jobs/retry-dead"),
                ("GET", "/queues"),
            ]:
                response = await client.request(method, path, headers=AUTH)
                assert response.status_code == 503, (path, response.text)
                assert response.headers["retry-after"] == str(RETRY_AFTER_SECONDS)
                assert response.headers["cache-control"] == "no-store"
                assert "database" in response.json()["detail"]
    finally:
        await engine.dispose()


async def _raised(call: Callable[[], Awaitable[object]]) -> BaseException:
    try:
        await call()
    except Exception as exc:
        return exc
    raise AssertionError("no error raised")


async def test_what_counts_as_the_database_being_unavailable(
    pg_server: PostgresServer,
    database_url: str,
    pool: asyncpg.Pool,
    crowded_user: str,
    tmp_path: Path,
) -> None:
    """Real errors, from asyncpg and through SQLAlchemy: a connection that cannot be had or
    was lost is an outage; a bad statement, a constraint or a file is not."""
    engine = create_async_engine(sqlalchemy_url(database_url))
    tight = create_async_engine(
        sqlalchemy_url(database_url), pool_size=1, max_overflow=0, pool_timeout=0.01
    )
    away = create_async_engine(UNREACHABLE_URL)

    async def statement(sql: str) -> None:
        async with engine.connect() as conn:
            await conn.execute(text(sql))

    async def use_closed() -> None:
        conn = await asyncpg.connect(database_url)
        await conn.close()
        await conn.fetch("SELECT 1")

    async def use_terminated() -> None:
        conn = await asyncpg.connect(database_url)
        await pool.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        await conn.fetch("SELECT 1")

    async def sqlalchemy_terminated() -> None:
        async with engine.connect() as conn:
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            await pool.execute("SELECT pg_terminate_backend($1)", pid)
            await conn.execute(text("SELECT 1"))

    async def pool_exhausted() -> None:
        async with tight.connect(), tight.connect():  # a pool of one has no second
            pass

    async def sqlalchemy_refused() -> None:
        async with away.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def statement_timeout() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SET statement_timeout = '1ms'"))
            await conn.execute(text("SELECT pg_sleep(5)"))

    async def missing_file() -> None:
        await asyncio.to_thread((tmp_path / "none").read_text)

    async def bad_value() -> None:
        int("x")

    try:
        unavailable = {
            "refused": await _raised(lambda: asyncpg.connect(asyncpg_dsn(UNREACHABLE_URL))),
            "refused-through-sqlalchemy": await _raised(sqlalchemy_refused),
            "no-such-database": await _raised(
                lambda: asyncpg.connect(pg_server.url_for("no_such_database_here"))
            ),
            "too-many-connections": await _raised(
                lambda: asyncpg.connect(database_url, user=crowded_user)
            ),
            "connection-closed": await _raised(use_closed),
            "connection-terminated": await _raised(use_terminated),
            "terminated-through-sqlalchemy": await _raised(sqlalchemy_terminated),
            "pool-exhausted": await _raised(pool_exhausted),
        }
        available = {
            "syntax": await _raised(lambda: statement("SELEC 1")),
            "division-by-zero": await _raised(lambda: statement("SELECT 1 / 0")),
            "unique-violation": await _raised(
                lambda: statement("INSERT INTO outbox_jobs (id, task) VALUES (1, 'a'), (1, 'a')")
            ),
            "statement-timeout": await _raised(statement_timeout),
            "missing-file": await _raised(missing_file),
            "bad-value": await _raised(bad_value),
        }
    finally:
        for each in (engine, tight, away):
            await each.dispose()
    missed = {
        name: repr(exc) for name, exc in unavailable.items() if not is_database_unavailable(exc)
    }
    assert missed == {}
    mistaken = {name: repr(exc) for name, exc in available.items() if is_database_unavailable(exc)}
    assert mistaken == {}
