"""The admin service through its HTTP face, the JSON routes of
``outbox_worker.web.create_admin_router`` on the library's own host (``admin_host``): the
database away: 503 with Retry-After, not 500, and what counts as the database being
unavailable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import httpx
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from outbox_worker.config import asyncpg_dsn, sqlalchemy_url
from outbox_worker.db import is_database_unavailable
from outbox_worker.devdb import PostgresServer
from outbox_worker.web import create_admin_router
from outbox_worker.web.router import RETRY_AFTER_SECONDS
from tests.admin_support import AUTH, TOKEN

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
