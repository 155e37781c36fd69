"""outbox_worker.testing through every session kind enqueue takes (the callers of
tests/drivers_support.py), on real PostgreSQL: the async helpers awaited on an async one,
their sync twins (outbox_worker.testing.sync) called on a sync one. Each kind sees its own
uncommitted jobs and gives the same answers; on a raw connection outside a transaction each
helper runs alone; a session of the other side is refused at the call, naming the twin."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, ExitStack
from typing import Any

import asyncpg
import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from outbox_worker import WrongSession, testing
from outbox_worker.testing import assert_enqueued, clear_jobs, refute_enqueued
from outbox_worker.testing import sync as testing_sync
from tests.drivers_support import (
    KINDS,
    AsyncCaller,
    Caller,
    SyncCaller,
    open_caller,
    sqlalchemy_url,
)
from tests.testing_tasks import committed


async def helper(caller: Caller, name: str, *args: Any, **kwargs: Any) -> Any:
    """outbox_worker.testing's ``name`` on the caller's session: awaited, or its sync twin."""
    if isinstance(caller, AsyncCaller):
        return await getattr(testing, name)(caller.session, *args, **kwargs)
    assert isinstance(caller, SyncCaller)
    return getattr(testing_sync, name)(caller.session, *args, **kwargs)


OpenCaller = Callable[[], Awaitable[Caller]]


@pytest.fixture(params=KINDS)
async def open_kind(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[OpenCaller]:
    """Opens callers of one kind, each in a transaction of its own; all closed at the end."""
    async with AsyncExitStack() as stack:
        # SQLModel's sessions warn on execute(): no helper may call it, nor anything else
        # that warns.
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("error")

        async def open_one() -> Caller:
            caller = await open_caller(request.param, database_url, stack)
            stack.push_async_callback(leave_transaction_block, caller)
            return caller

        yield open_one


async def leave_transaction_block(caller: Caller) -> None:
    """Leave a psycopg caller's ``conn.transaction()`` block before its connection closes:
    left to the garbage collector, it would be left on a closed connection, whose file
    descriptor the event loop may have handed to another by then."""
    blocks = getattr(caller, "blocks", None)
    if isinstance(blocks, AsyncExitStack):
        await blocks.aclose()
    elif isinstance(blocks, ExitStack):
        blocks.close()


async def test_every_kind_sees_its_own_uncommitted_jobs_and_not_anothers(
    open_kind: OpenCaller,
) -> None:
    mine = await open_kind()
    other = await open_kind()
    job = await mine.enqueue("t_add", {"a": 1, "b": 2})

    [found] = await helper(mine, "assert_enqueued", "t_add", {"a": 1})
    assert found == job  # every column read back, whatever the driver
    await helper(other, "refute_enqueued", "t_add")  # not committed: another transaction's
    with pytest.raises(AssertionError, match=r"found 0\noutbox_jobs is empty \(as this session"):
        await helper(other, "assert_enqueued", "t_add")

    await mine.commit()
    [seen] = await helper(other, "assert_enqueued", "t_add", {"b": 2}, count=1)
    assert seen == job


async def test_every_kind_gives_the_same_answers_and_failure_messages(
    open_kind: OpenCaller,
) -> None:
    caller = await open_kind()
    job = await caller.enqueue("t_add", {"a": 1, "b": 2}, key="k-1", priority=3, queue="q")
    other = await caller.enqueue("t_fails", {"message": "no"})
    listed = (
        "outbox_jobs holds (as this session sees it):\n"
        f'  #{job.id} t_add queue=q state=queued attempts=0/5 args={{"a": 1, "b": 2}} '
        "priority=3 key='k-1'\n"
        f'  #{other.id} t_fails queue=default state=queued attempts=0/3 args={{"message": "no"}}'
    )

    found = await helper(
        caller, "assert_enqueued", "t_add", {"a": 1}, queue="q", state="queued", key="k-1"
    )
    assert found == [job]
    assert await helper(caller, "assert_enqueued", "t_add", priority=3, count=1) == [job]
    with pytest.raises(AssertionError) as missing:
        await helper(caller, "assert_enqueued", "t_add", {"a": 2}, priority=3)
    assert str(missing.value) == (
        """expected a job of task 't_add' with args containing {"a": 2}, priority=3, found 0\n"""
        + listed
    )
    with pytest.raises(AssertionError) as miscounted:
        await helper(caller, "assert_enqueued", "t_fails", count=2)
    assert str(miscounted.value) == f"expected 2 jobs of task 't_fails', found 1\n{listed}"

    await helper(caller, "refute_enqueued", "t_add", {"a": 1}, max_attempts=4)
    with pytest.raises(AssertionError) as matched:
        await helper(caller, "refute_enqueued", "t_add", {"a": 1}, key="k-1")
    assert str(matched.value) == (
        """expected no job of task 't_add' with args containing {"a": 1}, key='k-1', """
        "found 1:\n" + listed.splitlines()[1]
    )


async def test_every_kind_clears_the_jobs_in_its_own_transaction(
    open_kind: OpenCaller, pool: asyncpg.Pool
) -> None:
    caller = await open_kind()
    await caller.enqueue("t_add", {"a": 1})
    await caller.enqueue("t_add", {"a": 2})
    await caller.commit()

    assert await helper(caller, "clear_jobs") == 2
    await helper(caller, "refute_enqueued", "t_add")
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 2  # not committed
    await caller.rollback()
    await helper(caller, "assert_enqueued", "t_add", count=2)

    assert await helper(caller, "clear_jobs") == 2
    await caller.commit()
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 0


async def test_on_a_raw_connection_outside_a_transaction_each_helper_runs_alone(
    database_url: str, engine: AsyncEngine
) -> None:
    """Reading commits nothing; clear_jobs there commits at once, as any statement does."""
    await committed(engine, "t_add", {"a": 1})
    conn = await asyncpg.connect(database_url)
    try:
        await assert_enqueued(conn, "t_add", {"a": 1}, count=1)
        assert await clear_jobs(conn) == 1
        assert not conn.is_in_transaction()
    finally:
        await conn.close()
    async with AsyncSession(engine) as elsewhere:
        await refute_enqueued(elsewhere, "t_add")  # the deletion is committed

    await committed(engine, "t_add", {"a": 2})
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as aconn:
        await refute_enqueued(aconn, "t_add", {"a": 1})
        assert await clear_jobs(aconn) == 1
    await committed(engine, "t_add", {"a": 3})
    with psycopg.Connection.connect(database_url, autocommit=True) as sconn:
        testing_sync.assert_enqueued(sconn, "t_add", {"a": 3})
        assert testing_sync.clear_jobs(sconn) == 1
    async with AsyncSession(engine) as elsewhere:
        await refute_enqueued(elsewhere, "t_add")


async def test_a_session_of_the_other_side_is_refused_at_the_call_naming_the_twin(
    engine: AsyncEngine, database_url: str
) -> None:
    """Called without await, as a sync test would by mistake, the async helper raises at once
    rather than leave a coroutine that never asserts anything."""
    sync_engine = create_engine(sqlalchemy_url(database_url, "psycopg"))
    try:
        with Session(sync_engine) as session, warnings.catch_warnings():
            warnings.simplefilter("error")  # no "coroutine was never awaited" either
            pattern = r"call outbox_worker\.testing\.sync\.assert_enqueued\(\), which is not"
            with pytest.raises(WrongSession, match=pattern):
                assert_enqueued(session, "t_add")  # type: ignore[arg-type,unused-coroutine]
            with pytest.raises(WrongSession, match=r"testing\.sync\.clear_jobs\(\)"):
                clear_jobs(session)  # type: ignore[arg-type,unused-coroutine]
            assert not session.in_transaction()  # no statement went out
    finally:
        sync_engine.dispose()
    async with AsyncSession(engine) as async_session:
        with pytest.raises(
            WrongSession, match=r"call `await outbox_worker\.testing\.refute_enqueued\(\.\.\.\)`"
        ):
            testing_sync.refute_enqueued(async_session, "t_add")  # type: ignore[arg-type]
        assert not async_session.in_transaction()
    with pytest.raises(WrongSession, match=r"assert_enqueued\(\) cannot use .*an engine or pool"):
        assert_enqueued(engine, "t_add")  # type: ignore[arg-type,unused-coroutine]
    with pytest.raises(WrongSession, match=r"testing\.sync\.clear_jobs\(\) cannot use"):
        testing_sync.clear_jobs("postgresql://")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["assert_enqueued", "refute_enqueued", "clear_jobs"])
def test_the_sync_twins_take_the_same_parameters(name: str) -> None:
    def parameters(function: Any) -> list[tuple[str, Any, Any]]:
        values = inspect.signature(function).parameters.values()
        return [(p.name, p.kind, p.default) for p in values]

    assert parameters(getattr(testing_sync, name)) == parameters(getattr(testing, name))
