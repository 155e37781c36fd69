"""The library's RequestIdMiddleware in an app of its own (not the sample service): the
request's X-Request-ID becomes each enqueued job's correlation_id, with no code of the app's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import asyncpg
import httpx
from fastapi import Depends, FastAPI, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

import tests.workload  # noqa: F401 -- registers the tasks enqueue checks names against
from outbox_worker import enqueue
from outbox_worker.web import REQUEST_ID_HEADER, RequestIdMiddleware


async def session(request: Request) -> AsyncIterator[AsyncSession]:
    async with AsyncSession(request.app.state.engine) as s, s.begin():
        yield s


def _app(engine: AsyncEngine) -> FastAPI:
    app = FastAPI()
    app.state.engine = engine
    app.add_middleware(RequestIdMiddleware)

    @app.post("/things")
    async def make_thing(s: Annotated[AsyncSession, Depends(session, scope="function")]) -> int:
        job = await enqueue(s, "noop")
        return job.id

    return app


async def test_the_request_id_becomes_the_jobs_correlation_id(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    transport = httpx.ASGITransport(app=_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        given = await client.post("/things", headers={"X-Request-ID": "order-42.retry:1"})
        made_up = await client.post("/things", headers={"X-Request-ID": "no spaces allowed"})
    assert given.headers[REQUEST_ID_HEADER] == "order-42.retry:1"
    assert made_up.headers[REQUEST_ID_HEADER] != "no spaces allowed"
    rows = await pool.fetch(
        "SELECT id, correlation_id FROM outbox_jobs WHERE id = ANY($1::bigint[]) ORDER BY id",
        [given.json(), made_up.json()],
    )
    assert [r["correlation_id"] for r in rows] == [
        "order-42.retry:1",
        made_up.headers[REQUEST_ID_HEADER],
    ]
