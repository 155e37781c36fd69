"""outbox_worker.testing, the helpers an app's tests use, on real PostgreSQL: what was
enqueued (through every session kind enqueue takes, async or with the sync twins), draining
the due jobs as a worker would, one handler run alone, a clean queue. The sample service's
tests written with them, as docs/testing.md shows, are in tests/sample/test_welcome_email.py."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, ExitStack
from datetime import UTC, datetime
from typing import Any

import asyncpg
import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from outbox_worker import (
    InvalidArgs,
    JobContext,
    JobState,
    OutboxError,
    Registry,
    UnknownTask,
    WrongSession,
    current_correlation_id,
    enqueue,
    testing,
)
from outbox_worker.testing import (
    DrainResult,
    assert_enqueued,
    clear_jobs,
    drain,
    perform_job,
    refute_enqueued,
)
from outbox_worker.testing import sync as testing_sync
from tests.support import Enqueuer
from tests.test_drivers import (
    KINDS,
    AsyncCaller,
    Caller,
    SyncCaller,
    open_caller,
    sqlalchemy_url,
)

tasks = Registry()
# The test's pool, for handlers that act on the database behind their drain's back.
side_pool: contextvars.ContextVar[asyncpg.Pool] = contextvars.ContextVar("side_pool")


@tasks.task(queue="t_fast")
async def t_add(ctx: JobContext, a: int, b: int = 0) -> int:
    return a + b


@tasks.task(max_attempts=3)
async def t_fails(ctx: JobContext, message: str) -> None:
    raise RuntimeError(message)


@tasks.task()
async def t_chain(ctx: JobContext, n: int) -> int:
    """Enqueues the next link (n - 1) in the transaction that completes this one."""
    async with ctx.transaction() as conn:
        if n > 1:
            await conn.execute(
                "INSERT INTO outbox_jobs (task, args) VALUES ('t_chain', $1::jsonb)",
                json.dumps({"n": n - 1}),
            )
    return n


@tasks.task()
async def t_taken_over(ctx: JobContext) -> None:
    """Its row is taken by another worker while it runs (a rescuer after a lapsed lease)."""
    await side_pool.get().execute(
        "UPDATE outbox_jobs SET locked_by = 'another-worker' WHERE id = $1", ctx.job_id
    )


@tasks.task()
async def t_cancelled_meanwhile(ctx: JobContext) -> None:
    """An operator asks to cancel it while it runs; then it fails."""
    await side_pool.get().execute(
        "UPDATE outbox_jobs SET cancel_requested_at = now() WHERE id = $1", ctx.job_id
    )
    raise RuntimeError("stopped")


@tasks.task()
async def t_context(ctx: JobContext, **args: Any) -> dict[str, Any]:
    return {
        "args": args,
        "job_id": ctx.job_id,
        "task": ctx.task,
        "queue": ctx.queue,
        "attempt": ctx.attempt,
        "max_attempts": ctx.max_attempts,
        "correlation_id": ctx.correlation_id,
        "seen_correlation_id": current_correlation_id.get(),
        "cancel_requested": ctx.cancel_requested,
    }


@tasks.task()
async def t_writes(ctx: JobContext, note: str) -> str:
    async with ctx.transaction() as conn:
        await conn.execute("INSERT INTO test_effects (job_id, note) VALUES ($1, $2)", 7, note)
        ctx.result = note
    return note


@tasks.task()
async def t_writes_then_fails(ctx: JobContext) -> None:
    async with ctx.transaction() as conn:
        await conn.execute("INSERT INTO test_effects (job_id, note) VALUES (8, 'undone')")
        raise RuntimeError("after the write")


@tasks.task(timeout=0.05)
async def t_hangs(ctx: JobContext) -> None:
    await asyncio.Event().wait()


async def committed(engine: AsyncEngine, task: str, args: dict[str, Any], **options: Any) -> int:
    async with AsyncSession(engine) as session, session.begin():
        job = await enqueue(session, task, args, **options)
    return job.id


async def row(pool: asyncpg.Pool, job_id: int) -> asyncpg.Record:
    return await pool.fetchrow(
        "SELECT state, attempts, result::text AS result, last_error, locked_by, finished_at, "
        "run_at > now() AS later FROM outbox_jobs WHERE id = $1",
        job_id,
    )


# ---------------------------------------------------------------------------------------------
# assert_enqueued, refute_enqueued, clear_jobs
# ---------------------------------------------------------------------------------------------


async def test_the_callers_uncommitted_jobs_are_seen_through_its_own_session(
    db: Enqueuer, engine: AsyncEngine
) -> None:
    job = await enqueue(db, "t_add", {"a": 1, "b": 2})
    assert [found.id for found in await assert_enqueued(db, "t_add", {"a": 1, "b": 2})] == [job.id]
    async with AsyncSession(engine) as elsewhere:
        await refute_enqueued(elsewhere, "t_add")  # not committed: nobody else sees it


async def test_args_match_as_a_subset_and_a_failure_lists_what_is_enqueued(
    db: Enqueuer,
) -> None:
    job = await enqueue(db, "t_add", {"a": 1, "b": 2}, key="k-1")
    [found] = await assert_enqueued(db, "t_add", {"a": 1})
    assert found.args == {"a": 1, "b": 2}
    await assert_enqueued(db, "t_add", {})

    with pytest.raises(AssertionError) as failure:
        await assert_enqueued(db, "t_add", {"a": 2})
    message = str(failure.value)
    assert message.startswith(
        """expected a job of task 't_add' with args containing {"a": 2}, found 0\n"""
    )
    assert (
        f'#{job.id} t_add queue=t_fast state=queued attempts=0/5 args={{"a": 1, "b": 2}} '
        "key='k-1'"
    ) in message
    await refute_enqueued(db, "t_add", {"a": 2})
    await refute_enqueued(db, "t_add", {"c": None})


async def test_a_failure_on_an_empty_table_says_it_is_empty(db: Enqueuer) -> None:
    with pytest.raises(AssertionError, match="outbox_jobs is empty"):
        await assert_enqueued(db, "t_add")


MATCHING: dict[str, tuple[Any, Any]] = {
    "queue": ("other", "t_fast"),
    "state": (JobState.QUEUED, "dead"),
    "priority": (7, 0),
    "max_attempts": (3, 5),
    "key": ("k-2", "k-3"),
    "correlation_id": ("corr-1", "corr-2"),
}


@pytest.mark.parametrize("name", sorted(MATCHING))
async def test_each_filter_narrows_to_its_column(db: Enqueuer, name: str) -> None:
    job = await enqueue(
        db,
        "t_add",
        {"a": 1},
        queue="other",
        priority=7,
        max_attempts=3,
        key="k-2",
        correlation_id="corr-1",
    )
    match, miss = MATCHING[name]
    [found] = await assert_enqueued(db, "t_add", **{name: match})
    assert found.id == job.id
    with pytest.raises(AssertionError, match=f"{name}={miss!r}"):
        await assert_enqueued(db, "t_add", **{name: miss})
    await refute_enqueued(db, "t_add", **{name: miss})
    with pytest.raises(AssertionError, match=f"#{job.id} t_add"):
        await refute_enqueued(db, "t_add", **{name: match})


async def test_a_state_that_does_not_exist_is_refused(db: Enqueuer) -> None:
    with pytest.raises(ValueError, match="bogus"):
        await assert_enqueued(db, "t_add", state="bogus")


async def test_count_asks_for_exactly_that_many(db: Enqueuer) -> None:
    await enqueue(db, "t_add", {"a": 1})
    await enqueue(db, "t_add", {"a": 1, "b": 1})
    assert len(await assert_enqueued(db, "t_add", {"a": 1}, count=2)) == 2
    await assert_enqueued(db, "t_add", {"b": 1}, count=1)
    await assert_enqueued(db, "t_add", {"b": 2}, count=0)
    with pytest.raises(AssertionError, match=r"expected 1 job of task 't_add'.*, found 2"):
        await assert_enqueued(db, "t_add", {"a": 1}, count=1)


async def test_a_long_list_shows_the_newest_jobs(db: Enqueuer) -> None:
    ids = [(await enqueue(db, "t_add", {"a": n})).id for n in range(25)]
    with pytest.raises(AssertionError) as failure:
        await assert_enqueued(db, "t_fails")
    message = str(failure.value)
    assert "the newest 20 shown" in message
    assert f"#{ids[-1]} t_add" in message
    assert f"#{ids[5]} t_add" in message
    assert f"#{ids[4]} t_add" not in message


async def test_clear_jobs_empties_the_queue_in_the_callers_transaction(
    db: Enqueuer,
) -> None:
    for n in range(3):
        await enqueue(db, "t_add", {"a": n})
    assert await clear_jobs(db) == 3
    await refute_enqueued(db, "t_add")
    assert await clear_jobs(db) == 0


# ---------------------------------------------------------------------------------------------
# Every session kind enqueue takes (tests/test_drivers.py's callers): the async helpers
# awaited on an async one, their sync twins (outbox_worker.testing.sync) called on a sync one
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# drain
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["url", "pool"])
async def test_drain_runs_the_due_jobs_as_a_worker_would(
    engine: AsyncEngine, pool: asyncpg.Pool, database_url: str, given: str
) -> None:
    ids = [await committed(engine, "t_add", {"a": n, "b": 10}) for n in range(3)]
    result = await drain(tasks, database_url if given == "url" else pool)
    assert result == DrainResult(succeeded=3, job_ids=tuple(ids))
    assert result.ran == 3
    for n, job_id in enumerate(ids):
        done = await row(pool, job_id)
        assert (done["state"], done["attempts"], done["result"]) == ("succeeded", 1, str(n + 10))
        assert done["locked_by"] is None
        assert done["finished_at"] is not None


async def test_a_failed_attempt_waits_for_its_backoff_and_the_drain_ends(
    engine: AsyncEngine, pool: asyncpg.Pool, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUTBOX_RETRY_BASE_SECONDS", "3600")
    job_id = await committed(engine, "t_fails", {"message": "smtp is down"})
    assert await drain(tasks, database_url) == DrainResult(retried=1, job_ids=(job_id,))
    failed = await row(pool, job_id)
    assert (failed["state"], failed["attempts"], failed["later"]) == ("queued", 1, True)
    assert failed["last_error"].startswith("RuntimeError: smtp is down")
    assert await drain(tasks, database_url) == DrainResult()


async def test_a_last_attempt_and_a_job_that_can_never_run_go_dead(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    last = await committed(engine, "t_fails", {"message": "no"}, max_attempts=1)
    unknown = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, queue) VALUES ('nobody_has_it', 'default') RETURNING id"
    )
    misfit = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args) VALUES ('t_chain', '{\"m\": 1}') RETURNING id"
    )
    result = await drain(tasks, pool)
    assert result == DrainResult(dead=3, job_ids=(last, unknown, misfit))
    assert (await row(pool, unknown))["last_error"].startswith("unknown task 'nobody_has_it'")
    assert "do not fit" in (await row(pool, misfit))["last_error"]


async def test_jobs_a_drained_job_enqueues_are_drained_too_and_limit_bounds_them(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    await committed(engine, "t_chain", {"n": 3})
    result = await drain(tasks, pool)
    assert (result.succeeded, result.ran) == (3, 3)  # completed in ctx.transaction()

    await committed(engine, "t_chain", {"n": 5})
    bounded = await drain(tasks, pool, limit=2)
    assert (bounded.succeeded, bounded.ran) == (2, 2)
    async with AsyncSession(engine) as session:
        await assert_enqueued(session, "t_chain", {"n": 3}, state="queued", count=1)
    assert await drain(tasks, pool, limit=0) == DrainResult()


async def test_drain_serves_only_the_queues_asked_for(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    fast = await committed(engine, "t_add", {"a": 1})
    default = await committed(engine, "t_context", {})
    assert await drain(tasks, pool, queues=["t_fast"]) == DrainResult(succeeded=1, job_ids=(fast,))
    assert (await row(pool, default))["state"] == "queued"
    with pytest.raises(TypeError, match=r"queues=\['t_fast'\]"):
        await drain(tasks, pool, queues="t_fast")
    with pytest.raises(ValueError, match="limit"):
        await drain(tasks, pool, limit=-1)


async def test_jobs_not_due_and_jobs_not_committed_are_left_alone(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    later = await committed(engine, "t_add", {"a": 1}, delay=3600)
    async with AsyncSession(engine) as session, session.begin():
        await enqueue(session, "t_add", {"a": 2})
        assert await drain(tasks, pool) == DrainResult()
    assert (await row(pool, later))["state"] == "queued"
    assert (await drain(tasks, pool)).succeeded == 1  # the one committed since


async def test_an_outcome_is_fenced_like_the_workers(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    side_pool.set(pool)
    taken = await committed(engine, "t_taken_over", {})
    cancelled = await committed(engine, "t_cancelled_meanwhile", {})
    result = await drain(tasks, pool)
    assert result == DrainResult(lost=1, cancelled=1, job_ids=(taken, cancelled))
    lost = await row(pool, taken)
    assert (lost["state"], lost["locked_by"]) == ("running", "another-worker")
    assert (await row(pool, cancelled))["state"] == "cancelled"


async def test_a_drained_jobs_correlation_id_stays_out_of_the_callers_context(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    job_id = await committed(engine, "t_context", {}, correlation_id="req-42")
    token = current_correlation_id.set("the-test")
    try:
        await drain(tasks, pool)
        assert current_correlation_id.get() == "the-test"
    finally:
        current_correlation_id.reset(token)
    result = json.loads((await row(pool, job_id))["result"])
    assert (result["correlation_id"], result["seen_correlation_id"]) == ("req-42", "req-42")


# ---------------------------------------------------------------------------------------------
# perform_job
# ---------------------------------------------------------------------------------------------


async def test_perform_job_calls_the_handler_with_a_real_context_and_json_args() -> None:
    seen = await perform_job(
        tasks, "t_context", {"items": (1, 2), "n": 1}, job_id=9, attempt=2, correlation_id="c-1"
    )
    assert seen == {
        "args": {"items": [1, 2], "n": 1},
        "job_id": 9,
        "task": "t_context",
        "queue": "default",
        "attempt": 2,
        "max_attempts": 5,
        "correlation_id": "c-1",
        "seen_correlation_id": "c-1",
        "cancel_requested": False,
    }
    assert current_correlation_id.get() is None
    assert await perform_job(tasks, "t_add", {"a": 2, "b": 3}) == 5


async def test_perform_job_refuses_what_a_worker_could_not_run() -> None:
    with pytest.raises(UnknownTask, match="'t_add'"):
        await perform_job(tasks, "nobody_has_it", {})
    with pytest.raises(InvalidArgs, match="do not fit"):
        await perform_job(tasks, "t_add", {"b": 1})
    with pytest.raises(InvalidArgs, match="not JSON"):
        await perform_job(tasks, "t_context", {"when": datetime.now(UTC)})


async def test_perform_job_raises_what_the_handler_raises_and_keeps_its_timeout() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        await perform_job(tasks, "t_fails", {"message": "boom"})
    with pytest.raises(TimeoutError):
        await perform_job(tasks, "t_hangs")


async def test_without_a_database_ctx_transaction_says_what_to_pass() -> None:
    with pytest.raises(OutboxError, match=r"perform_job\(\.\.\., database=\.\.\.\)"):
        await perform_job(tasks, "t_writes", {"note": "x"})


@pytest.mark.parametrize("given", ["url", "pool"])
async def test_ctx_transaction_commits_the_handlers_writes_and_no_job_row(
    pool: asyncpg.Pool, database_url: str, given: str
) -> None:
    database = database_url if given == "url" else pool
    assert await perform_job(tasks, "t_writes", {"note": "hi"}, database=database) == "hi"
    assert await pool.fetch("SELECT job_id, note FROM test_effects") == [(7, "hi")]
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 0


@pytest.mark.parametrize("given", ["pool", "connection"])
async def test_a_handler_that_raises_in_ctx_transaction_leaves_no_write(
    pool: asyncpg.Pool, given: str
) -> None:
    async with pool.acquire() as conn:
        outer = conn.transaction()
        await outer.start()
        with pytest.raises(RuntimeError, match="after the write"):
            await perform_job(
                tasks, "t_writes_then_fails", database=conn if given == "connection" else pool
            )
        # On the connection, only the savepoint was rolled back: its transaction goes on.
        assert await conn.fetchval("SELECT count(*) FROM test_effects") == 0
        await conn.execute("INSERT INTO test_effects (job_id, note) VALUES (9, 'kept')")
        await outer.commit()
    assert await pool.fetch("SELECT job_id, note FROM test_effects") == [(9, "kept")]


async def test_on_a_connection_ctx_transaction_is_a_savepoint_of_its_transaction(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn:
        outer = conn.transaction()
        await outer.start()
        await perform_job(tasks, "t_writes", {"note": "inside"}, database=conn)
        assert await conn.fetchval("SELECT note FROM test_effects") == "inside"
        assert await pool.fetchval("SELECT count(*) FROM test_effects") == 0
        await outer.rollback()
    assert await pool.fetchval("SELECT count(*) FROM test_effects") == 0
