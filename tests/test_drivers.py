"""Enqueue from every session or connection an app may hold, on a real PostgreSQL: SQLAlchemy
(and SQLModel) async and sync sessions and connections on asyncpg, psycopg 3 and psycopg2, and
raw asyncpg and psycopg 3 connections. Every kind must give the same answers: a commit keeps
the job, a rollback leaves none, the same key twice is one job, a bad argument is refused with
nothing written and the transaction still usable; and a session of the wrong kind is refused
before any SQL, with the function to use named.
"""

from __future__ import annotations

import abc
import asyncio
import json
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, ExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg.rows import dict_row
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlmodel import Session as SQLModelSession
from sqlmodel.ext.asyncio.session import AsyncSession as SQLModelAsyncSession

import outbox_worker
import outbox_worker.sync
from outbox_worker import (
    ArgsTooLarge,
    EnqueueError,
    InvalidArgs,
    InvalidName,
    InvalidOption,
    Job,
    NewJob,
    Outbox,
    QueueFull,
    UnknownTask,
    WrongSession,
)
from tests.workload import registry

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


@pytest.fixture(params=KINDS)
async def caller(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[Caller]:
    assert "echo" in registry  # the workload's tasks, which the module-level enqueue finds
    async with AsyncExitStack() as stack:
        # SQLModel's AsyncSession warns on execute(): enqueue must not call it (nor anything
        # else that warns), so every warning is an error here.
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("error")
        yield await open_caller(request.param, database_url, stack)


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


# --------------------------------------------------------------------------------------------
# The same answers on every kind
# --------------------------------------------------------------------------------------------


async def test_commit_keeps_the_jobs_and_rollback_leaves_none(
    caller: Caller, pool: asyncpg.Pool
) -> None:
    gone = await caller.enqueue("echo", {"n": 1})
    await caller.enqueue_many([NewJob("echo", {"n": 2}), NewJob("noop", key="k")])
    assert await caller.scalar("SELECT count(*) FROM outbox_jobs") == 3  # its own view
    assert await committed(pool) == []  # never committed by enqueue
    await caller.rollback()
    assert await committed(pool) == []

    kept = await caller.enqueue("echo", {"n": 3})
    many = await caller.enqueue_many([NewJob("echo", {"n": 4}), NewJob("noop", key="k")])
    assert await committed(pool) == []
    await caller.commit()
    rows = await committed(pool)
    assert [r["id"] for r in rows] == [kept.id, *(j.id for j in many)]
    assert gone.id not in [r["id"] for r in rows]
    for job, row in zip([kept, *many], rows, strict=True):
        assert_is_the_row(job, row)
        assert job.duplicate is False


async def test_the_returned_jobs_are_the_rows(
    caller: Caller, pool: asyncpg.Pool, correlation: str
) -> None:
    at = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    jobs = [
        await caller.enqueue("sleepy", {"seconds": 0}),  # the task's queue, "slow"
        await caller.enqueue(
            "echo",
            {"text": "héllo ✓", "list": [1, None, {"a": True}]},
            queue="other",
            priority=-7,
            max_attempts=2,
            delay=timedelta(minutes=5),
            correlation_id="req-own",
        ),
        await caller.enqueue("always_fails", run_at=at, key="at"),
        # One task's jobs alike but for their args take the short batch statement ...
        *await caller.enqueue_many([NewJob("echo", {"i": i}, delay=30) for i in range(3)]),
        # ... mixed ones the general one.
        *await caller.enqueue_many(
            [NewJob("noop", priority=3), NewJob("echo", {"i": 9}, run_at=at, key="b")]
        ),
    ]
    await caller.commit()
    rows = await committed(pool)
    assert len(rows) == len(jobs) == 8
    for job, row in zip(jobs, rows, strict=True):
        assert_is_the_row(job, row)
    assert jobs[0].queue == "slow"
    assert (jobs[1].queue, jobs[1].priority, jobs[1].max_attempts) == ("other", -7, 2)
    assert jobs[1].run_at - jobs[1].created_at == timedelta(minutes=5)
    assert [j.correlation_id for j in jobs] == [correlation, "req-own", *[correlation] * 6]
    assert jobs[2].run_at == at
    assert jobs[2].max_attempts == 3  # always_fails' own


async def test_the_same_key_twice_is_one_job(caller: Caller, pool: asyncpg.Pool) -> None:
    first = await caller.enqueue("echo", {"n": 1}, key="order-1")
    again = await caller.enqueue("echo", {"n": 2}, key="order-1")
    await caller.commit()
    later = await caller.enqueue("echo", {"n": 3}, key="order-1", priority=9)
    batch = await caller.enqueue_many(
        [
            NewJob("echo", {"n": 4}, key="order-1"),  # committed before
            NewJob("echo", {"n": 5}, key="order-2"),  # new
            NewJob("echo", {"n": 6}, key="order-2"),  # the same call's
        ]
    )
    await caller.commit()

    assert [first.duplicate, again.duplicate, later.duplicate] == [False, True, True]
    assert [j.duplicate for j in batch] == [True, False, True]
    assert again.id == later.id == batch[0].id == first.id
    assert batch[2].id == batch[1].id != first.id
    # The existing job, not the refused call's arguments.
    assert (later.args, later.priority) == ({"n": 1}, 0)
    assert batch[2].args == {"n": 5}
    rows = await committed(pool)
    assert [(r["dedupe_key"], json.loads(r["args_text"])) for r in rows] == [
        ("order-1", {"n": 1}),
        ("order-2", {"n": 5}),
    ]
    assert_is_the_row(later, rows[0])


BAD: list[tuple[str, dict[str, Any], type[EnqueueError]]] = [
    ("unknown-task", {"task": "no_such_task"}, UnknownTask),
    ("task-name", {"task": "echo'; DROP TABLE outbox_jobs; --"}, InvalidName),
    ("args-list", {"args": [1, 2]}, InvalidArgs),
    ("args-nan", {"args": {"x": float("nan")}}, InvalidArgs),
    ("args-nul", {"args": {"x": "\x00"}}, InvalidArgs),
    ("too-large", {"args": {"x": "y" * 100}, "max_args_bytes": 64}, ArgsTooLarge),
    ("queue-name", {"queue": "bad queue"}, InvalidName),
    ("naive-run-at", {"run_at": datetime(2030, 1, 1)}, InvalidOption),
    ("priority", {"priority": 2**31}, InvalidOption),
    ("key-nul", {"key": "\x00"}, InvalidOption),
]


async def test_a_bad_argument_is_refused_with_nothing_written(
    caller: Caller, pool: asyncpg.Pool
) -> None:
    before = await caller.enqueue("noop", {"before": True}, key="before")
    for _, kwargs, error in BAD:
        options = dict(kwargs)
        task, args = options.pop("task", "echo"), options.pop("args", {"ok": 1})
        limit = options.pop("max_args_bytes", None)
        with pytest.raises(error):
            await caller.enqueue(task, args, max_args_bytes=limit, **options)
        with pytest.raises(error):
            await caller.enqueue_many(
                [NewJob("noop"), NewJob(task, args, **options)], max_args_bytes=limit
            )
    # Nothing of that reached the database: the transaction goes on, and commits.
    after = await caller.enqueue("noop", {"after": True}, key="after")
    await caller.commit()
    assert [r["id"] for r in await committed(pool)] == [before.id, after.id]


async def test_backpressure_counts_through_the_callers_driver(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """The depth count is a statement of the plan too: every driver sends it."""
    for kind in KINDS:
        await pool.execute("DELETE FROM outbox_jobs")
        outbox = Outbox(registry, queue_depth_limits={"default": 2}, queue_depth_cache_seconds=0)
        async with AsyncExitStack() as stack:
            caller = await open_caller(kind, database_url, stack, outbox)
            await caller.enqueue("echo")
            await caller.enqueue_many([NewJob("echo")])
            with pytest.raises(QueueFull):
                await caller.enqueue("echo")
            with pytest.raises(QueueFull):
                await caller.enqueue_many([NewJob("noop")])
            await caller.enqueue("sleepy", {"seconds": 0})  # another queue: not limited
            await caller.commit()
        assert [r["queue"] for r in await committed(pool)] == ["default", "default", "slow"], kind


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
