"""Enqueue from every session or connection an app may hold, on a real PostgreSQL: SQLAlchemy
(and SQLModel) async and sync sessions and connections on asyncpg, psycopg 3 and psycopg2, and
raw asyncpg and psycopg 3 connections. Every kind must give the same answers: a commit keeps
the job, a rollback leaves none, the same key twice is one job, a bad argument is refused with
nothing written and the transaction still usable. The callers are in tests/drivers_support.py.
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from outbox_worker import (
    ActiveKey,
    ArgsTooLarge,
    Debounce,
    EnqueueError,
    InvalidArgs,
    InvalidName,
    InvalidOption,
    NewJob,
    Outbox,
    QueueFull,
    Throttle,
    UnknownTask,
)
from tests.drivers_support import KINDS, Caller, assert_is_the_row, committed, open_caller
from tests.workload import registry


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


async def test_scoped_keys_answer_alike_on_every_kind(caller: Caller, pool: asyncpg.Pool) -> None:
    active = await caller.enqueue("echo", {"n": 1}, key=ActiveKey("a"))
    throttled = await caller.enqueue("echo", {"n": 2}, key=Throttle("t", per=60))
    debounced = await caller.enqueue("echo", {"n": 3}, key=Debounce("d", period=30))
    await caller.commit()
    again = await caller.enqueue_many(
        [
            NewJob("echo", {"n": 4}, key=ActiveKey("a")),
            NewJob("echo", {"n": 5}, key=Throttle("t", per=60)),
            NewJob("echo", {"n": 6}, key=Debounce("d", period=30)),
        ]
    )
    await caller.commit()
    assert [job.duplicate for job in (active, throttled, debounced)] == [False] * 3
    assert [job.duplicate for job in again] == [True] * 3
    assert [job.id for job in again] == [active.id, throttled.id, debounced.id]
    assert again[2].args == {"n": 6}, "a debounced job takes the last args"
    rows = {r["id"]: json.loads(r["args_text"]) for r in await committed(pool)}
    assert rows == {active.id: {"n": 1}, throttled.id: {"n": 2}, debounced.id: {"n": 6}}


async def test_tags_are_stored_alike_on_every_kind(caller: Caller, pool: asyncpg.Pool) -> None:
    one = await caller.enqueue("echo", {"n": 1}, tags=["tenant:acme", "vip"])
    uniform = await caller.enqueue_many(
        [NewJob("echo", {"n": n}, tags=("tenant:acme",)) for n in (2, 3)]
    )
    mixed = await caller.enqueue_many(
        [NewJob("echo", {"n": 4}, tags=["a", "b"]), NewJob("echo", {"n": 5}), NewJob("noop")]
    )
    await caller.commit()
    assert one.tags == ("tenant:acme", "vip")
    assert [job.tags for job in uniform] == [("tenant:acme",)] * 2
    assert [job.tags for job in mixed] == [("a", "b"), (), ()]
    stored = {
        r["id"]: r["tags"] for r in await pool.fetch("SELECT id, tags FROM outbox_jobs ORDER BY id")
    }
    assert stored == {
        one.id: ["tenant:acme", "vip"],
        uniform[0].id: ["tenant:acme"],
        uniform[1].id: ["tenant:acme"],
        mixed[0].id: ["a", "b"],
        mixed[1].id: None,
        mixed[2].id: None,
    }


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
    ("tags-text", {"tags": "vip"}, InvalidOption),
    ("tag-empty", {"tags": [""]}, InvalidOption),
    ("tags-many", {"tags": [f"t{n}" for n in range(21)]}, InvalidOption),
    ("concurrency-key-empty", {"concurrency_key": ""}, InvalidOption),
    ("concurrency-key-control", {"concurrency_key": "tenant\nacme"}, InvalidOption),
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
