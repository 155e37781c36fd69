"""The callers the driver tests and outbox_worker.testing's tests enqueue through: one per
session or connection an app may hold (SQLAlchemy and SQLModel async and sync sessions and
connections on asyncpg, psycopg 3 and psycopg2, raw asyncpg and psycopg 3 connections), each
inside a transaction; and the committed rows as another connection reads them.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from contextlib import AsyncExitStack, ExitStack
from typing import Any

import asyncpg
import psycopg
from psycopg.rows import dict_row
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlmodel import Session as SQLModelSession
from sqlmodel.ext.asyncio.session import AsyncSession as SQLModelAsyncSession

import outbox_worker
import outbox_worker.sync
from outbox_worker import Job, NewJob, Outbox

# --------------------------------------------------------------------------------------------
# One caller per kind: the session or connection an app holds, inside a transaction
# --------------------------------------------------------------------------------------------


class Caller(abc.ABC):
    """A session or connection with an open transaction, and the enqueue functions of its
    side: an Outbox's when one is given, else the module-level ones."""

    def __init__(self, outbox: Outbox | None) -> None:
        self.outbox = outbox

    @abc.abstractmethod
    async def enqueue(self, task: str | NewJob, args: Any = None, **options: Any) -> Job: ...

    @abc.abstractmethod
    async def enqueue_many(self, jobs: Sequence[NewJob], **options: Any) -> list[Job]: ...

    @abc.abstractmethod
    async def commit(self) -> None:
        """Commit, and go on in a new transaction."""

    @abc.abstractmethod
    async def rollback(self) -> None:
        """Roll back, and go on in a new transaction."""

    @abc.abstractmethod
    async def scalar(self, statement: str) -> Any:
        """One value, read in the caller's own transaction."""


class AsyncCaller(Caller):
    def __init__(self, outbox: Outbox | None, session: Any) -> None:
        super().__init__(outbox)
        self.session = session

    async def enqueue(self, task: str | NewJob, args: Any = None, **options: Any) -> Job:
        function = outbox_worker.enqueue if self.outbox is None else self.outbox.enqueue
        if isinstance(task, NewJob):
            return await function(self.session, task, **options)
        return await function(self.session, task, args, **options)

    async def enqueue_many(self, jobs: Sequence[NewJob], **options: Any) -> list[Job]:
        if self.outbox is None:
            return await outbox_worker.enqueue_many(self.session, jobs, **options)
        return await self.outbox.enqueue_many(self.session, jobs, **options)


class SyncCaller(Caller):
    def __init__(self, outbox: Outbox | None, session: Any) -> None:
        super().__init__(outbox)
        self.session = session

    async def enqueue(self, task: str | NewJob, args: Any = None, **options: Any) -> Job:
        function = outbox_worker.sync.enqueue if self.outbox is None else self.outbox.sync.enqueue
        if isinstance(task, NewJob):
            return function(self.session, task, **options)
        return function(self.session, task, args, **options)

    async def enqueue_many(self, jobs: Sequence[NewJob], **options: Any) -> list[Job]:
        if self.outbox is None:
            return outbox_worker.sync.enqueue_many(self.session, jobs, **options)
        return self.outbox.sync.enqueue_many(self.session, jobs, **options)


class SQLAlchemyAsync(AsyncCaller):
    """An AsyncSession (SQLAlchemy's or SQLModel's) or AsyncConnection; each autobegins."""

    async def commit(self) -> None:
        await self.session.commit()

    async def rollback(self) -> None:
        await self.session.rollback()

    async def scalar(self, statement: str) -> Any:
        conn = (
            await self.session.connection()
            if isinstance(self.session, AsyncSession)
            else self.session
        )
        return (await conn.execute(text(statement))).scalar_one()


class SQLAlchemySync(SyncCaller):
    """A Session (SQLAlchemy's or SQLModel's) or Connection; each autobegins."""

    async def commit(self) -> None:
        self.session.commit()

    async def rollback(self) -> None:
        self.session.rollback()

    async def scalar(self, statement: str) -> Any:
        conn = self.session.connection() if isinstance(self.session, Session) else self.session
        return conn.execute(text(statement)).scalar_one()


class Asyncpg(AsyncCaller):
    """A raw asyncpg connection, its transaction opened by the app."""

    async def begin(self) -> None:
        self.transaction = self.session.transaction()
        await self.transaction.start()

    async def commit(self) -> None:
        await self.transaction.commit()
        await self.begin()

    async def rollback(self) -> None:
        await self.transaction.rollback()
        await self.begin()

    async def scalar(self, statement: str) -> Any:
        return await self.session.fetchval(statement)


class PsycopgAsync(AsyncCaller):
    """A raw psycopg AsyncConnection: autocommit off (its first statement begins), or on
    inside ``conn.transaction()``."""

    async def begin(self) -> None:
        if self.session.autocommit:
            self.blocks = AsyncExitStack()
            await self.blocks.enter_async_context(self.session.transaction())

    async def commit(self) -> None:
        if self.session.autocommit:
            await self.blocks.aclose()
            await self.begin()
        else:
            await self.session.commit()

    async def rollback(self) -> None:
        if self.session.autocommit:
            await self.blocks.__aexit__(psycopg.Rollback, psycopg.Rollback(), None)
            await self.begin()
        else:
            await self.session.rollback()

    async def scalar(self, statement: str) -> Any:
        cursor = await self.session.execute(statement)
        row = await cursor.fetchone()
        return next(iter(row.values())) if isinstance(row, dict) else row[0]


class Psycopg(SyncCaller):
    """A raw psycopg Connection: autocommit off, or on inside ``conn.transaction()``."""

    def begin(self) -> None:
        if self.session.autocommit:
            self.blocks = ExitStack()
            self.blocks.enter_context(self.session.transaction())

    async def commit(self) -> None:
        if self.session.autocommit:
            self.blocks.close()
            self.begin()
        else:
            self.session.commit()

    async def rollback(self) -> None:
        if self.session.autocommit:
            self.blocks.__exit__(psycopg.Rollback, psycopg.Rollback(), None)
            self.begin()
        else:
            self.session.rollback()

    async def scalar(self, statement: str) -> Any:
        row = self.session.execute(statement).fetchone()
        return next(iter(row.values())) if isinstance(row, dict) else row[0]


def sqlalchemy_url(database_url: str, driver: str) -> str:
    return database_url.replace("postgresql://", f"postgresql+{driver}://", 1)


KINDS = [
    "sqlalchemy-async-session-asyncpg",
    "sqlalchemy-async-connection-asyncpg",
    "sqlalchemy-async-session-psycopg",
    "sqlalchemy-async-connection-psycopg",
    "sqlmodel-async-session-asyncpg",
    "sqlmodel-async-session-psycopg",
    "sqlalchemy-session-psycopg",
    "sqlalchemy-connection-psycopg",
    "sqlalchemy-session-psycopg2",
    "sqlalchemy-connection-psycopg2",
    "sqlmodel-session-psycopg",
    "sqlmodel-session-psycopg2",
    "asyncpg-connection",
    "asyncpg-pool-connection",
    "psycopg-async-connection",
    "psycopg-async-connection-autocommit-in-transaction",
    "psycopg-connection",
    "psycopg-connection-autocommit-in-transaction",
]


async def open_caller(
    kind: str, database_url: str, stack: AsyncExitStack, outbox: Outbox | None = None
) -> Caller:
    """The caller of ``kind`` on ``database_url``; ``stack`` closes it."""
    parts = kind.split("-")
    if parts[0] in ("sqlalchemy", "sqlmodel") and parts[1] == "async":
        async_engine = create_async_engine(sqlalchemy_url(database_url, parts[-1]))
        stack.push_async_callback(async_engine.dispose)
        if parts[2] == "connection":
            conn = await stack.enter_async_context(async_engine.connect())
            return SQLAlchemyAsync(outbox, conn)
        factory = SQLModelAsyncSession if parts[0] == "sqlmodel" else AsyncSession
        session = await stack.enter_async_context(factory(async_engine))
        return SQLAlchemyAsync(outbox, session)
    if parts[0] in ("sqlalchemy", "sqlmodel"):
        engine = create_engine(sqlalchemy_url(database_url, parts[-1]))
        stack.callback(engine.dispose)
        if parts[1] == "connection":
            return SQLAlchemySync(outbox, stack.enter_context(engine.connect()))
        sync_factory = SQLModelSession if parts[0] == "sqlmodel" else Session
        return SQLAlchemySync(outbox, stack.enter_context(sync_factory(engine)))
    if parts[0] == "asyncpg":
        if parts[1] == "pool":
            pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
            stack.push_async_callback(pool.close)
            raw = await stack.enter_async_context(pool.acquire())
        else:
            raw = await asyncpg.connect(database_url)
            stack.push_async_callback(raw.close)
        caller = Asyncpg(outbox, raw)
        await caller.begin()
        return caller
    autocommit = kind.endswith("autocommit-in-transaction")
    if parts[1] == "async":
        # dict rows: enqueue must read its rows whatever row factory the app chose.
        aconn = await psycopg.AsyncConnection.connect(
            database_url, autocommit=autocommit, row_factory=dict_row
        )
        stack.push_async_callback(aconn.close)
        async_caller = PsycopgAsync(outbox, aconn)
        await async_caller.begin()
        return async_caller
    sconn = psycopg.Connection.connect(database_url, autocommit=autocommit, row_factory=dict_row)
    stack.callback(sconn.close)
    sync_caller = Psycopg(outbox, sconn)
    sync_caller.begin()
    return sync_caller


async def committed(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    """Every committed job, as another connection reads it."""
    return list(await pool.fetch("SELECT *, args::text AS args_text FROM outbox_jobs ORDER BY id"))


def assert_is_the_row(job: Job, row: asyncpg.Record) -> None:
    assert (job.id, job.task, job.queue, job.state) == (
        row["id"],
        row["task"],
        row["queue"],
        row["state"],
    )
    assert job.args == json.loads(row["args_text"])
    assert (job.priority, job.attempts, job.max_attempts) == (
        row["priority"],
        row["attempts"],
        row["max_attempts"],
    )
    assert (job.run_at, job.created_at) == (row["run_at"], row["created_at"])
    assert (job.dedupe_key, job.correlation_id) == (row["dedupe_key"], row["correlation_id"])
