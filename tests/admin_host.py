"""The library's HTTP host in its tests: a FastAPI app made of ``outbox_worker.web`` alone,
mounted as any app would mount it (and as app/main.py does), so that the admin routes and
the dashboard are tested without the sample service, whose own tests are in tests/sample/.

It imports the public API only, as an app does. tests/conftest.py builds it in process
(``admin_host``); the dashboard's browser tests serve it under uvicorn
(``uvicorn --factory tests.admin_host:from_environment``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from outbox_worker import sqlalchemy_url
from outbox_worker.web import RequestIdMiddleware, create_admin_router, handle_database_outages

SessionDependency = Callable[[], AsyncIterator[AsyncSession]]
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]

# How recent a worker's heartbeat must be for the dashboard to count the worker as alive
# (the sample's default too).
WORKER_SEEN_WITHIN_SECONDS = 60.0


def plain(engine: AsyncEngine) -> SessionDependency:
    """The natural dependency: a session, no transaction opened, nothing committed."""

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with AsyncSession(engine) as session:
            yield session

    return get_session


def begun(engine: AsyncEngine) -> SessionDependency:
    """A session inside a transaction the dependency opened and commits on the way out, as
    app/api/deps.py's is: the routes' own commits must not make that a second one."""

    async def get_session() -> AsyncIterator[AsyncSession]:
        async with AsyncSession(engine) as session, session.begin():
            yield session

    return get_session


def token_of(request: Request) -> str | None:
    """The token of the app serving the request: each test's host has its own."""
    token: str | None = request.app.state.admin_token
    return token


def create_admin_host(
    get_session: SessionDependency,
    *,
    admin_token: str | None = None,
    lifespan: Lifespan | None = None,
) -> FastAPI:
    """The request id middleware, the admin router with its dashboard, and 503s for database
    outages. The token is read from ``app.state.admin_token`` at each request, as the sample
    reads its settings, so that a test can turn admin on and off (``None``: off)."""
    host = FastAPI(title="pgoutbox admin host", lifespan=lifespan)
    host.state.admin_token = admin_token
    host.add_middleware(RequestIdMiddleware)
    host.include_router(
        create_admin_router(
            get_session=get_session,
            admin_token=token_of,
            worker_seen_within_seconds=WORKER_SEEN_WITHIN_SECONDS,
        )
    )
    handle_database_outages(host)
    return host


def from_environment() -> FastAPI:
    """The host on ``DATABASE_URL``, with ``OUTBOX_ADMIN_TOKEN`` (unset or empty: admin off),
    for uvicorn's ``--factory``; its engine is disposed when uvicorn stops."""
    engine = create_async_engine(sqlalchemy_url(os.environ["DATABASE_URL"]))

    @asynccontextmanager
    async def disposing(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await engine.dispose()

    return create_admin_host(
        begun(engine),
        admin_token=os.environ.get("OUTBOX_ADMIN_TOKEN") or None,
        lifespan=disposing,
    )
