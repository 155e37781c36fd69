"""Enqueue given what it cannot write through, on a real PostgreSQL: a session of the wrong
kind (sync for async, async for sync, an engine or pool, a raw connection outside a
transaction) is refused before any SQL, with the function to use named. And autocommit=True:
a job that commits on its own on a raw connection outside a transaction, refused where the
job would join a transaction.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from sqlmodel import Session as SQLModelSession

import outbox_worker
import outbox_worker.sync
from outbox_worker import InvalidOption, NewJob, Outbox, WrongSession
from tests.drivers_support import assert_is_the_row, committed, sqlalchemy_url
from tests.workload import registry

# --------------------------------------------------------------------------------------------
# The wrong kind, refused before any SQL
# --------------------------------------------------------------------------------------------


@pytest.fixture
def sync_engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(sqlalchemy_url(database_url, "psycopg"))
    yield engine
    engine.dispose()


@pytest.mark.parametrize("factory", [Session, SQLModelSession], ids=["sqlalchemy", "sqlmodel"])
def test_a_sync_session_given_to_the_async_enqueue_is_refused_at_the_call(
    sync_engine: Engine, factory: type[Session]
) -> None:
    """Called without await, as sync code does by mistake, it raises at once (it used to
    give a RuntimeWarning and no job); and asyncio.run() of it raises before the INSERT."""
    with factory(sync_engine) as session, warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine was never awaited" either
        with pytest.raises(WrongSession, match=r"outbox_worker\.sync\.enqueue\(\)"):
            outbox_worker.enqueue(session, "echo", {"n": 1})  # type: ignore[call-overload]
        with pytest.raises(WrongSession, match=r"outbox_worker\.sync\.enqueue_many\(\)"):
            asyncio.run(outbox_worker.enqueue_many(session, [NewJob("echo")]))  # type: ignore[arg-type]
        with pytest.raises(WrongSession, match=r"\.sync\.enqueue\(\)"):
            Outbox(registry).enqueue(session, "echo")  # type: ignore[call-overload]
        # No statement went out: the session never began a transaction.
        assert not session.in_transaction()
        assert session.connection().execute(text("SELECT count(*) FROM outbox_jobs")).scalar() == 0


async def test_an_async_session_given_to_the_sync_enqueue_is_refused(
    engine: AsyncEngine, database_url: str, pool: asyncpg.Pool
) -> None:
    async with AsyncSession(engine) as session:
        with pytest.raises(WrongSession, match=r"await outbox_worker\.enqueue\(\.\.\.\)"):
            outbox_worker.sync.enqueue(session, "echo")  # type: ignore[call-overload]
        with pytest.raises(WrongSession, match=r"await outbox_worker\.enqueue_many\(\.\.\.\)"):
            Outbox(registry).sync.enqueue_many(session, [NewJob("echo")])  # type: ignore[arg-type]
        assert not session.in_transaction()
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            with pytest.raises(WrongSession, match="await"):
                outbox_worker.sync.enqueue(conn, "echo")
    finally:
        await conn.close()
    async with await psycopg.AsyncConnection.connect(database_url) as aconn:
        with pytest.raises(WrongSession, match="await"):
            outbox_worker.sync.enqueue(aconn, "echo")  # type: ignore[call-overload]
    with (
        psycopg.Connection.connect(database_url) as sconn,
        pytest.raises(WrongSession, match=r"outbox_worker\.sync\.enqueue\(\)"),
    ):
        outbox_worker.enqueue(sconn, "echo")  # type: ignore[call-overload]
    assert await committed(pool) == []


async def test_a_raw_connection_outside_a_transaction_is_refused(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """There the INSERT would commit on its own, apart from the app's writes."""
    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(WrongSession, match=r"async with conn\.transaction\(\)"):
            await outbox_worker.enqueue(conn, "echo")
        with pytest.raises(WrongSession, match="not in a transaction"):
            await outbox_worker.enqueue_many(conn, [NewJob("echo")])
        assert await conn.fetchval("SELECT 1") == 1  # the connection is fine
    finally:
        await conn.close()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as aconn:
        with pytest.raises(WrongSession, match=r"`async with conn\.transaction\(\):`"):
            await outbox_worker.enqueue(aconn, "echo")
    with psycopg.Connection.connect(database_url, autocommit=True) as sconn:
        with pytest.raises(WrongSession, match=r"`with conn\.transaction\(\):`"):
            outbox_worker.sync.enqueue(sconn, "echo")
        with pytest.raises(WrongSession, match="autocommit"):
            outbox_worker.sync.enqueue_many(sconn, [NewJob("echo")])
    assert await committed(pool) == []


async def test_what_is_no_session_at_all_is_refused(
    engine: AsyncEngine, pool: asyncpg.Pool, sync_engine: Engine
) -> None:
    with pytest.raises(WrongSession, match="an engine or pool, not a transaction"):
        outbox_worker.enqueue(engine, "echo")  # type: ignore[call-overload]
    with pytest.raises(WrongSession, match="an engine or pool"):
        await outbox_worker.enqueue(pool, "echo")
    with pytest.raises(WrongSession, match="an engine or pool"):
        outbox_worker.sync.enqueue(sync_engine, "echo")  # type: ignore[call-overload]
    with pytest.raises(WrongSession, match="AsyncSession"):
        outbox_worker.enqueue("postgresql://", "echo")  # type: ignore[call-overload]
    assert await committed(pool) == []


# --------------------------------------------------------------------------------------------
# autocommit=True: a job that commits on its own, on a raw connection outside a transaction
# --------------------------------------------------------------------------------------------


async def test_autocommit_commits_each_job_at_once_on_a_raw_connection(
    database_url: str, pool: asyncpg.Pool
) -> None:
    outbox = Outbox(registry)
    conn = await asyncpg.connect(database_url)
    try:
        first = await outbox.enqueue(conn, "echo", {"n": 1}, key="alone", autocommit=True)
        assert [r["id"] for r in await committed(pool)] == [first.id]  # no commit needed
        again = await outbox_worker.enqueue(conn, "echo", {"n": 2}, key="alone", autocommit=True)
        many = await outbox.enqueue_many(
            conn, [NewJob("noop"), NewJob("echo", key="alone")], autocommit=True
        )
        assert not conn.is_in_transaction()
    finally:
        await conn.close()
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as aconn:
        async_job = await outbox.enqueue(aconn, "noop", autocommit=True)
    with psycopg.Connection.connect(database_url, autocommit=True) as sconn:
        sync_jobs = outbox.sync.enqueue_many(sconn, [NewJob("noop")], autocommit=True)
        sync_job = outbox_worker.sync.enqueue(sconn, "noop", autocommit=True)

    assert (again.duplicate, again.id, again.args) == (True, first.id, {"n": 1})
    assert [j.duplicate for j in many] == [False, True]
    assert many[1].id == first.id
    rows = await committed(pool)
    assert [r["id"] for r in rows] == [
        first.id,
        many[0].id,
        async_job.id,
        sync_jobs[0].id,
        sync_job.id,
    ]
    for job, row in zip([first, many[0], async_job, *sync_jobs, sync_job], rows, strict=True):
        assert_is_the_row(job, row)


async def test_autocommit_is_refused_where_the_job_would_join_a_transaction(
    engine: AsyncEngine, sync_engine: Engine, database_url: str, pool: asyncpg.Pool
) -> None:
    """A job asked to commit alone must not slip into a transaction that may roll back."""
    async with AsyncSession(engine) as session:
        with pytest.raises(WrongSession, match="SQLAlchemy"):
            await outbox_worker.enqueue(session, "echo", autocommit=True)
        assert not session.in_transaction()
    with Session(sync_engine) as sync_session, pytest.raises(WrongSession, match="SQLAlchemy"):
        outbox_worker.sync.enqueue_many(sync_session, [NewJob("echo")], autocommit=True)
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            with pytest.raises(WrongSession, match="in a transaction, which the job would join"):
                await outbox_worker.enqueue(conn, "echo", autocommit=True)
    finally:
        await conn.close()
    async with await psycopg.AsyncConnection.connect(database_url) as aconn:
        with pytest.raises(WrongSession, match="autocommit mode is off"):
            await outbox_worker.enqueue(aconn, "echo", autocommit=True)
    with (
        psycopg.Connection.connect(database_url, autocommit=True) as sconn,
        sconn.transaction(),
        pytest.raises(WrongSession, match="would join a transaction"),
    ):
        outbox_worker.sync.enqueue(sconn, "echo", autocommit=True)
    assert await committed(pool) == []


async def test_autocommit_must_be_a_bool(database_url: str, pool: asyncpg.Pool) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(InvalidOption, match="autocommit must be True or False"):
            await outbox_worker.enqueue(conn, "echo", autocommit="yes")  # type: ignore[call-overload]
    finally:
        await conn.close()
    assert await committed(pool) == []
