"""The explicit client, on a real PostgreSQL: an Outbox enqueues the tasks of the registry it
was given (and the names it declares without handlers), with the settings it was given at
start-up, never the environment's; and a task handle builds jobs whose arguments mypy checks.

The ``# type: ignore[...]`` comments below are tests too: mypy runs with
``warn_unused_ignores``, so a call that mypy stopped refusing fails ``make typecheck``.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import structlog
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

import outbox_worker
from outbox_worker import (
    ArgsTooLarge,
    ConfigError,
    DeclaredTask,
    InvalidArgs,
    InvalidOption,
    JobContext,
    NewJob,
    Outbox,
    QueueFull,
    Registry,
    Task,
    TaskDefinitionError,
    UnknownTask,
)
from outbox_worker.enqueue_plans import default_backpressure, default_max_args_bytes
from tests.workload import registry as workload_registry

tasks = Registry()


@tasks.task(queue="mail", max_attempts=8)
async def welcome(ctx: JobContext, user_id: int, greeting: str = "hello") -> dict[str, Any]:
    """Greets a user."""
    return {"user_id": user_id, "greeting": greeting, "job": ctx.job_id}


@tasks.task
async def anything(ctx: JobContext, **kwargs: Any) -> None:
    return None


async def rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return list(await pool.fetch("SELECT *, args::text AS args_text FROM outbox_jobs ORDER BY id"))


@pytest.fixture
async def session(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    async with AsyncSession(engine) as session:
        yield session


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """OUTBOX_* settings for this test, which the module-level functions read on first use."""
    default_max_args_bytes.cache_clear()
    default_backpressure.cache_clear()
    yield monkeypatch
    default_max_args_bytes.cache_clear()
    default_backpressure.cache_clear()


# --------------------------------------------------------------------------------------------
# The registry and the names it enqueues: the ones it was given
# --------------------------------------------------------------------------------------------


async def test_an_outbox_enqueues_the_tasks_of_its_registry_only(
    session: AsyncSession, pool: asyncpg.Pool
) -> None:
    outbox = Outbox(tasks)
    job = await outbox.enqueue(session, "welcome", {"user_id": 1})
    # "echo" is a task of another registry alive in this process: not this Outbox's.
    assert "echo" in workload_registry
    with pytest.raises(UnknownTask, match="neither in this Outbox's registry nor declared"):
        await outbox.enqueue(session, "echo")
    with pytest.raises(UnknownTask):
        await outbox.enqueue_many(session, [NewJob("welcome", {"user_id": 2}), NewJob("echo")])
    # The module-level function keeps looking in every live registry.
    other = await outbox_worker.enqueue(session, "echo")
    await session.commit()
    assert [(r["task"], r["queue"], r["max_attempts"]) for r in await rows(pool)] == [
        ("welcome", "mail", 8),
        ("echo", "default", 5),
    ]
    assert (job.queue, other.queue) == ("mail", "default")


async def test_two_registries_with_one_name_each_keep_their_own(
    session: AsyncSession, pool: asyncpg.Pool
) -> None:
    """Where the module-level enqueue takes the registry added last, each Outbox takes its
    own."""

    async def report(ctx: JobContext) -> None:
        return None

    first, second = Registry(), Registry()
    first.add(report, name="t_report", queue="first")
    second.add(report, name="t_report", queue="second")
    jobs = [
        await Outbox(first).enqueue(session, "t_report"),
        await Outbox(second).enqueue(session, "t_report"),
        await Outbox(first).enqueue(session, "t_report"),
        await outbox_worker.enqueue(session, "t_report"),
    ]
    await session.commit()
    assert [j.queue for j in jobs] == ["first", "second", "first", "second"]
    assert [r["queue"] for r in await rows(pool)] == ["first", "second", "first", "second"]


async def test_a_declared_task_is_enqueued_by_name_without_its_handler(
    session: AsyncSession, pool: asyncpg.Pool
) -> None:
    """An API process whose handlers live in a worker's codebase declares the names."""
    outbox = Outbox(
        tasks=[
            DeclaredTask("billing.invoice", queue="billing", max_attempts=9, priority=4),
            DeclaredTask("billing.refund"),
        ]
    )
    assert Registry.find("billing.invoice") is None  # no handler anywhere in this process
    invoice = await outbox.enqueue(session, "billing.invoice", {"order": 7}, key="order-7")
    refund = await outbox.enqueue(session, "billing.refund", queue="urgent", priority=-1)
    [many] = await outbox.enqueue_many(session, [NewJob("billing.invoice", {"order": 8})])
    again = await outbox.enqueue(session, "billing.invoice", {"order": 7}, key="order-7")
    with pytest.raises(UnknownTask):
        await outbox.enqueue(session, "billing.unknown")
    with pytest.raises(UnknownTask):  # the module-level function knows no such name
        await outbox_worker.enqueue(session, "billing.invoice")
    await session.commit()

    assert again.duplicate
    assert again.id == invoice.id
    stored = [
        (r["task"], r["queue"], r["max_attempts"], r["priority"], json.loads(r["args_text"]))
        for r in await rows(pool)
    ]
    assert stored == [
        ("billing.invoice", "billing", 9, 4, {"order": 7}),
        ("billing.refund", "urgent", 5, -1, {}),
        ("billing.invoice", "billing", 9, 4, {"order": 8}),
    ]
    assert [refund.id, many.id] == [r["id"] for r in (await rows(pool))[1:]]


def test_a_task_declares_itself_for_a_process_without_its_handler() -> None:
    """``task.declared`` carries the options the registry gave the task, so an API process
    can be handed the same names and defaults as the worker's registry."""
    registry = Registry()

    @registry.task(name="declared.charge", queue="billing", max_attempts=9, priority=3)
    async def charge(ctx: JobContext, order: int) -> None: ...

    @registry.task(name="declared.plain")
    async def plain(ctx: JobContext) -> None: ...

    assert charge.declared == DeclaredTask("declared.charge", "billing", 9, 3)
    assert plain.declared == DeclaredTask("declared.plain")


async def test_a_registry_and_declared_names_together(
    session: AsyncSession, pool: asyncpg.Pool
) -> None:
    outbox = Outbox(tasks, tasks=[DeclaredTask("elsewhere", queue="far")])
    jobs = await outbox.enqueue_many(
        session, [NewJob("welcome", {"user_id": 3}), NewJob("elsewhere")]
    )
    await session.commit()
    assert [(j.task, j.queue) for j in jobs] == [("welcome", "mail"), ("elsewhere", "far")]
    assert [r["id"] for r in await rows(pool)] == [j.id for j in jobs]


# --------------------------------------------------------------------------------------------
# Settings: given at start-up
# --------------------------------------------------------------------------------------------


async def test_an_outbox_reads_no_setting_from_the_environment(
    environment: pytest.MonkeyPatch, session: AsyncSession, pool: asyncpg.Pool
) -> None:
    environment.setenv("OUTBOX_MAX_ARGS_BYTES", "16")
    environment.setenv("OUTBOX_QUEUE_DEPTH_LIMITS", json.dumps({"mail": 1}))
    environment.setenv("OUTBOX_QUEUE_DEPTH_CACHE_SECONDS", "0")
    outbox = Outbox(tasks, max_args_bytes=64)
    args = {"user_id": 1, "greeting": "x" * 20}  # 40 bytes as JSON: over 16, under 64
    for _ in range(3):  # past the environment's depth limit
        await outbox.enqueue(session, "welcome", args)
    with pytest.raises(ArgsTooLarge, match="the limit is 64"):
        await outbox.enqueue(session, "welcome", {"user_id": 1, "greeting": "x" * 60})
    await session.commit()
    # The module-level function does read the environment: it refuses both.
    with pytest.raises(ArgsTooLarge, match="the limit is 16"):
        await outbox_worker.enqueue(session, "welcome", args)
    with pytest.raises(QueueFull):
        await outbox_worker.enqueue(session, "welcome", {"user_id": 2})
    await session.rollback()
    assert len(await rows(pool)) == 3


async def test_from_env_reads_the_environment_when_built_not_later(
    environment: pytest.MonkeyPatch, session: AsyncSession, pool: asyncpg.Pool
) -> None:
    environment.setenv("OUTBOX_MAX_ARGS_BYTES", "32")
    environment.setenv("OUTBOX_QUEUE_DEPTH_LIMITS", json.dumps({"mail": 2}))
    environment.setenv("OUTBOX_QUEUE_DEPTH_CACHE_SECONDS", "0")
    outbox = Outbox.from_env(tasks)
    environment.setenv("OUTBOX_MAX_ARGS_BYTES", "1048576")
    environment.delenv("OUTBOX_QUEUE_DEPTH_LIMITS")
    with pytest.raises(ArgsTooLarge, match="the limit is 32"):
        await outbox.enqueue(session, "welcome", {"user_id": 1, "greeting": "x" * 30})
    await outbox.enqueue(session, "welcome", {"user_id": 1})
    await outbox.enqueue(session, "welcome", {"user_id": 2})
    with pytest.raises(QueueFull) as full:
        await outbox.enqueue(session, "welcome", {"user_id": 3})
    assert full.value.retry_after == 1
    await session.commit()
    assert len(await rows(pool)) == 2


async def test_the_sync_face_shares_the_settings_and_the_depth_cache(
    engine: AsyncEngine, database_url: str, pool: asyncpg.Pool
) -> None:
    """``outbox.sync`` is the same client: a depth counted by one face is not counted again
    by the other within the cache's time (an hour here, so the test is not timed)."""
    limits = {"mail": 1}
    outbox = Outbox(
        tasks, max_args_bytes=40, queue_depth_limits=limits, queue_depth_cache_seconds=3600
    )
    async with AsyncSession(engine) as session:
        await outbox.enqueue(session, "welcome", {"user_id": 1})  # counted: 0, fine for an hour
        await outbox.enqueue(session, "welcome", {"user_id": 2})
        await session.commit()
    sync_engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with Session(sync_engine) as sync_session:
            outbox.sync.enqueue(sync_session, "welcome", {"user_id": 3})  # still fine: cached
            with pytest.raises(ArgsTooLarge, match="the limit is 40"):
                outbox.sync.enqueue(sync_session, "welcome", {"user_id": 4, "greeting": "x" * 40})
            # A new client counts, and finds the queue full.
            with pytest.raises(QueueFull):
                Outbox(tasks, queue_depth_limits=limits).sync.enqueue(
                    sync_session, "welcome", {"user_id": 5}
                )
            sync_session.commit()
    finally:
        sync_engine.dispose()
    assert len(await rows(pool)) == 3


def test_bad_settings_are_refused_when_the_outbox_is_built() -> None:
    bad: list[dict[str, Any]] = [
        {"max_args_bytes": 0},
        {"max_args_bytes": True},
        {"max_args_bytes": "1024"},
        {"queue_depth_limits": {"bad queue": 1}},
        {"queue_depth_limits": {"q": 0}},
        {"queue_depth_limits": {"q": 1.5}},
        {"queue_depth_cache_seconds": -1},
        {"queue_depth_cache_seconds": math.inf},
        {"queue_depth_cache_seconds": math.nan},
        {"tasks": [DeclaredTask("t"), DeclaredTask("t", queue="other")]},
        {"tasks": [DeclaredTask("welcome")]},  # also in the registry
        {"tasks": ["welcome"]},
    ]
    for kwargs in bad:
        with pytest.raises(ConfigError):
            Outbox(tasks, **kwargs)
    with pytest.raises(ConfigError, match="DeclaredTask"):
        Outbox([DeclaredTask("t")])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "bad name"},
        {"name": ""},
        {"queue": "1queue"},
        {"max_attempts": 0},
        {"priority": 2**31},
        {"priority": -(2**31)},
    ],
)
def test_a_bad_declaration_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(TaskDefinitionError):
        DeclaredTask(**{"name": "ok", **kwargs})


def test_a_registered_priority_must_fit_the_column() -> None:
    async def handler(ctx: JobContext) -> None:
        return None

    with pytest.raises(TaskDefinitionError, match="32 bits"):
        Registry().add(handler, priority=2**31)


# --------------------------------------------------------------------------------------------
# Typed task handles
# --------------------------------------------------------------------------------------------


def context() -> JobContext:
    return JobContext(
        job_id=7,
        task="welcome",
        queue="mail",
        attempt=1,
        max_attempts=8,
        correlation_id=None,
        worker_id="test",
        pool=None,
        log=structlog.get_logger(),
    )


async def test_the_decorated_function_is_still_the_handler() -> None:
    assert isinstance(welcome, Task)
    assert await welcome(context(), user_id=1) == {"user_id": 1, "greeting": "hello", "job": 7}
    assert await welcome(context(), 2, "hi") == {"user_id": 2, "greeting": "hi", "job": 7}
    assert (welcome.__name__, welcome.__doc__) == ("welcome", "Greets a user.")
    assert welcome.name == "welcome"
    spec = tasks.get("welcome")
    assert spec is not None
    assert welcome.__wrapped__ is spec.handler
    # Registered again elsewhere, the task registers its handler.
    elsewhere = Registry()
    elsewhere.add(welcome, name="welcome_again")
    again = elsewhere.get("welcome_again")
    assert again is not None
    assert again.handler is spec.handler


def test_a_task_handle_builds_the_job_of_a_call() -> None:
    assert welcome.job(user_id=42) == NewJob("welcome", {"user_id": 42})
    assert welcome.job(42, "hi") == NewJob("welcome", {"user_id": 42, "greeting": "hi"})
    assert welcome.job(42, greeting="hi") == welcome.job(user_id=42, greeting="hi")
    keyed = welcome.job(user_id=42).with_options(key="welcome:42", delay=60, priority=3)
    assert keyed == NewJob("welcome", {"user_id": 42}, key="welcome:42", priority=3, delay=60)
    assert keyed.with_options(queue="other").key == "welcome:42"  # the others kept
    assert anything.job(a=1, b=[2]) == NewJob("anything", {"a": 1, "b": [2]})
    # What mypy refuses is refused at run time too, for callers it does not see...
    with pytest.raises(InvalidArgs, match="user"):
        welcome.job(user=42)  # type: ignore[call-arg]
    with pytest.raises(InvalidArgs):
        welcome.job()  # type: ignore[call-arg]
    with pytest.raises(InvalidArgs):
        welcome.job(1, "hi", "extra")  # type: ignore[call-arg]
    with pytest.raises(InvalidArgs):
        welcome.job(1, user_id=1)  # type: ignore[misc]
    # ... but the types are mypy's alone: JSON has no int to insist on.
    assert welcome.job(user_id="42").args == {"user_id": "42"}  # type: ignore[arg-type]


async def test_an_outbox_enqueues_a_task_handles_jobs(
    session: AsyncSession, database_url: str, pool: asyncpg.Pool
) -> None:
    outbox = Outbox(tasks)
    first = await outbox.enqueue(session, welcome.job(user_id=1).with_options(key="welcome:1"))
    again = await outbox.enqueue(session, welcome.job(user_id=1).with_options(key="welcome:1"))
    many = await outbox.enqueue_many(session, [welcome.job(user_id=i) for i in (2, 3)])
    with pytest.raises(InvalidOption, match="with_options"):
        await outbox.enqueue(session, welcome.job(user_id=4), key="k")  # type: ignore[call-overload]
    with pytest.raises(InvalidOption):
        await outbox.enqueue(session, welcome.job(user_id=4), {"user_id": 5})  # type: ignore[call-overload]
    await session.commit()
    sync_engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg2://"))
    try:
        with Session(sync_engine) as sync_session:
            synced = outbox.sync.enqueue(sync_session, welcome.job(4, "hey"))
            sync_session.commit()
    finally:
        sync_engine.dispose()

    assert (first.duplicate, again.duplicate, again.id) == (False, True, first.id)
    stored = [(r["task"], r["queue"], json.loads(r["args_text"])) for r in await rows(pool)]
    assert stored == [
        ("welcome", "mail", {"user_id": 1}),
        ("welcome", "mail", {"user_id": 2}),
        ("welcome", "mail", {"user_id": 3}),
        ("welcome", "mail", {"user_id": 4, "greeting": "hey"}),
    ]
    assert [j.id for j in [first, *many, synced]] == [r["id"] for r in await rows(pool)]
