"""The operator's commands on the database: a fresh engine per command, the schema checked
before jobs are read or changed, and a connection failure as one line rather than a
traceback (``db.database_error`` judges which failures those are)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from outbox_worker import db, migrate
from outbox_worker.config import sqlalchemy_url
from outbox_worker.db import database_error
from outbox_worker.errors import ConfigError, OutboxError

T = TypeVar("T")


def engine_for(dsn: str) -> AsyncEngine:
    # NullPool: a command makes one or a few short transactions and exits; nothing to keep.
    return create_async_engine(
        sqlalchemy_url(dsn),
        poolclass=NullPool,
        connect_args={"timeout": db.CONNECT_TIMEOUT_SECONDS},
    )


def with_engine(dsn: str, work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """Run ``work`` on a fresh engine; connection failures become one-line errors."""

    async def go() -> T:
        engine = engine_for(dsn)
        try:
            return await work(engine)
        except OutboxError:
            raise
        except Exception as exc:
            error = database_error(exc, dsn)
            if error is None:
                raise
            raise error from exc
        finally:
            await engine.dispose()

    return asyncio.run(go())


def with_schema(dsn: str, work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """``with_engine`` for the commands that read or change jobs, which first refuse, in one
    line naming the command to run, a database whose pgoutbox schema is missing or recorded
    behind this code's: they would fail on a missing table or column, or misread one."""

    async def checked(engine: AsyncEngine) -> T:
        async with engine.connect() as conn:
            state = await conn.run_sync(migrate.state_of)
        if state.status in ("absent", "behind"):
            raise ConfigError(state.summary(db.where(dsn)))
        return await work(engine)

    return with_engine(dsn, checked)


def in_transaction(dsn: str, call: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """One admin call inside ``engine.begin()``: it commits when the call returns."""

    async def work(engine: AsyncEngine) -> T:
        async with engine.begin() as conn:
            return await call(conn)

    return with_schema(dsn, work)
