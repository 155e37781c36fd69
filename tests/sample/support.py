"""Helpers shared by the sample service's test modules: a ``--burst`` worker run to its end,
rows and counts as another connection reads them, sign-ups and comments through the API,
the JSON detail of an error answer, and a client that sees when a response went out."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from tests.conftest import WorkerProcess

SpawnWorker = Callable[..., WorkerProcess]


async def run_burst_worker(spawn_worker: SpawnWorker) -> WorkerProcess:
    """One ``outbox-worker run app.tasks:registry --burst``, waited for; it must exit 0."""
    worker = spawn_worker("--burst", target="app.tasks:registry")
    code = await asyncio.to_thread(worker.wait, 90)
    assert code == 0, worker.output()
    return worker


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
