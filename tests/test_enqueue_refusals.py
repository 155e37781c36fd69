"""enqueue / enqueue_many refuse bad input before any SQL, on a real PostgreSQL: a typed
error, nothing written, the caller's transaction still usable (tests/test_hostile.py has the
nastier cases).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from outbox_worker import (
    ArgsTooLarge,
    EnqueueError,
    InvalidArgs,
    InvalidName,
    InvalidOption,
    NewJob,
    OutboxError,
    UnknownTask,
    enqueue,
    enqueue_many,
)
from tests.support import Enqueuer, job_rows


class _Unserialisable:
    pass


BAD_ENQUEUES: list[tuple[str, dict[str, Any], type[EnqueueError]]] = [
    # unknown tasks (valid names that no registry knows)
    ("unknown", {"task": "no_such_task"}, UnknownTask),
    ("unknown-case", {"task": "Echo"}, UnknownTask),
    ("unknown-128", {"task": "a" * 128}, UnknownTask),
    # args that are not a JSON object
    ("args-list", {"args": [1, 2]}, InvalidArgs),
    ("args-str", {"args": "x=1"}, InvalidArgs),
    ("args-int-key", {"args": {1: "a"}}, InvalidArgs),
    ("args-tuple-key", {"args": {("a",): 1}}, InvalidArgs),
    ("args-object", {"args": {"a": _Unserialisable()}}, InvalidArgs),
    ("args-set", {"args": {"a": {1, 2}}}, InvalidArgs),
    ("args-bytes", {"args": {"a": b"raw"}}, InvalidArgs),
    ("args-datetime", {"args": {"at": datetime(2030, 1, 1, tzinfo=UTC)}}, InvalidArgs),
    ("args-nan", {"args": {"a": math.nan}}, InvalidArgs),
    ("args-inf", {"args": {"a": [1.0, -math.inf]}}, InvalidArgs),
    ("args-nul-value", {"args": {"a": "x\x00y"}}, InvalidArgs),
    ("args-nul-key", {"args": {"a\x00": 1}}, InvalidArgs),
    ("args-nul-nested", {"args": {"a": {"b": ["ok", "\x00"]}}}, InvalidArgs),
    ("args-lone-surrogate", {"args": {"a": "\ud800"}}, InvalidArgs),
    # bad task and queue names
    ("task-empty", {"task": ""}, InvalidName),
    ("task-129", {"task": "a" * 129}, InvalidName),
    ("task-injection", {"task": "echo'; DROP TABLE outbox_jobs; --"}, InvalidName),
    ("task-quote", {"task": "echo'"}, InvalidName),
    ("task-digit-first", {"task": "1echo"}, InvalidName),
    ("task-underscore-first", {"task": "_echo"}, InvalidName),
    ("task-space", {"task": "ec ho"}, InvalidName),
    ("task-newline", {"task": "echo\n"}, InvalidName),
    ("task-nul", {"task": "echo\x00"}, InvalidName),
    ("task-unicode", {"task": "échо"}, InvalidName),
    ("queue-empty", {"queue": ""}, InvalidName),
    ("queue-129", {"queue": "q" * 129}, InvalidName),
    ("queue-injection", {"queue": "default'; DROP TABLE outbox_jobs; --"}, InvalidName),
    ("queue-digit-first", {"queue": "1q"}, InvalidName),
    ("queue-newline", {"queue": "q\n"}, InvalidName),
    ("queue-slash", {"queue": "a/b"}, InvalidName),
    ("queue-not-str", {"queue": 5}, InvalidName),
    # over the size limit
    ("too-large", {"args": {"a": "x" * 20}, "max_args_bytes": 16}, ArgsTooLarge),
    ("too-large-by-one", {"args": {"a": "x" * 9}, "max_args_bytes": 16}, ArgsTooLarge),
    # options out of range
    ("delay-negative", {"delay": -1}, InvalidOption),
    ("delay-tiny-negative", {"delay": -0.001}, InvalidOption),
    ("delay-nan", {"delay": math.nan}, InvalidOption),
    ("delay-inf", {"delay": math.inf}, InvalidOption),
    ("delay-minus-inf", {"delay": -math.inf}, InvalidOption),
    ("delay-negative-timedelta", {"delay": timedelta(seconds=-1)}, InvalidOption),
    ("delay-eleven-years", {"delay": timedelta(days=11 * 366)}, InvalidOption),
    ("delay-str", {"delay": "10"}, InvalidOption),
    ("run-at-naive", {"run_at": datetime(2030, 1, 1)}, InvalidOption),
    ("run-at-str", {"run_at": "2030-01-01T00:00:00+00:00"}, InvalidOption),
    # asyncpg sends these two instants as -infinity and infinity
    ("run-at-datetime-min", {"run_at": datetime.min.replace(tzinfo=UTC)}, InvalidOption),
    ("run-at-datetime-max", {"run_at": datetime.max.replace(tzinfo=UTC)}, InvalidOption),
    (
        "run-at-datetime-min-elsewhere",
        {"run_at": datetime(1, 1, 1, 2, tzinfo=timezone(timedelta(hours=2)))},
        InvalidOption,
    ),
    ("delay-and-run-at", {"delay": 5, "run_at": datetime(2030, 1, 1, tzinfo=UTC)}, InvalidOption),
    ("priority-too-big", {"priority": 2**31}, InvalidOption),
    ("priority-too-small", {"priority": -(2**31) - 1}, InvalidOption),
    ("priority-float", {"priority": 1.5}, InvalidOption),
    ("priority-bool", {"priority": True}, InvalidOption),
    ("max-attempts-zero", {"max_attempts": 0}, InvalidOption),
    ("max-attempts-negative", {"max_attempts": -1}, InvalidOption),
    ("max-attempts-too-big", {"max_attempts": 2**31}, InvalidOption),
    ("key-empty", {"key": ""}, InvalidOption),
    ("key-nul", {"key": "a\x00b"}, InvalidOption),
    ("key-too-long", {"key": "k" * 513}, InvalidOption),
    ("correlation-nul", {"correlation_id": "req\x00"}, InvalidOption),
    ("correlation-too-long", {"correlation_id": "r" * 256}, InvalidOption),
]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [(kwargs, error) for _, kwargs, error in BAD_ENQUEUES],
    ids=[name for name, _, _ in BAD_ENQUEUES],
)
async def test_bad_enqueue_raises_writes_nothing_and_keeps_the_transaction(
    db: Enqueuer, pool: asyncpg.Pool, kwargs: dict[str, Any], error: type[EnqueueError]
) -> None:
    call = {"task": "echo", "args": {"ok": 1}, **kwargs}
    before = await enqueue(db, "noop", {"before": True})
    with pytest.raises(error) as caught:
        await enqueue(db, **call)
    assert isinstance(caught.value, EnqueueError)
    assert isinstance(caught.value, OutboxError)
    assert str(caught.value)
    # The same transaction goes on: another enqueue works and both survive the commit.
    after = await enqueue(db, "noop", {"after": True})
    await db.commit()
    rows = await job_rows(pool)
    assert [r["id"] for r in rows] == [before.id, after.id]
    assert [r["task"] for r in rows] == ["noop", "noop"]


BAD_MANY: list[tuple[str, NewJob, type[EnqueueError]]] = [
    ("unknown", NewJob("no_such_task"), UnknownTask),
    ("args-list", NewJob("echo", [1]), InvalidArgs),  # type: ignore[arg-type]
    ("args-nan", NewJob("echo", {"x": math.nan}), InvalidArgs),
    ("args-nul", NewJob("echo", {"x": "\x00"}), InvalidArgs),
    ("args-lone-surrogate", NewJob("echo", {"x": "\udfff"}), InvalidArgs),
    ("task-name", NewJob("echo;--"), InvalidName),
    ("queue-name", NewJob("echo", queue="bad queue"), InvalidName),
    ("too-large", NewJob("echo", {"x": "y" * 100}), ArgsTooLarge),
    ("naive-run-at", NewJob("echo", run_at=datetime(2030, 1, 1)), InvalidOption),
    ("delay-and-run-at", NewJob("echo", delay=1, run_at=datetime.now(UTC)), InvalidOption),
    ("delay-negative", NewJob("echo", delay=-5), InvalidOption),
    ("priority", NewJob("echo", priority=2**31), InvalidOption),
    ("max-attempts", NewJob("echo", max_attempts=0), InvalidOption),
    ("key-nul", NewJob("echo", key="\x00"), InvalidOption),
]


@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize(
    ("bad", "error"),
    [(bad, error) for _, bad, error in BAD_MANY],
    ids=[name for name, _, _ in BAD_MANY],
)
async def test_enqueue_many_with_one_bad_job_writes_none_of_them(
    db: Enqueuer,
    pool: asyncpg.Pool,
    bad: NewJob,
    error: type[EnqueueError],
    position: str,
) -> None:
    good = [NewJob("echo", {"i": i}, key=f"good-{i}") for i in range(4)]
    index = {"first": 0, "middle": 2, "last": len(good)}[position]
    batch = [*good[:index], bad, *good[index:]]
    with pytest.raises(error) as caught:
        await enqueue_many(db, batch, max_args_bytes=64)
    assert isinstance(caught.value, EnqueueError)
    assert isinstance(caught.value, OutboxError)
    # Nothing of the batch was written, and the transaction goes on: the same good jobs
    # (same keys) are new, not duplicates of rows left behind by the failed call.
    jobs = await enqueue_many(db, good)
    assert [j.duplicate for j in jobs] == [False] * len(good)
    await db.commit()
    rows = await job_rows(pool)
    assert [r["id"] for r in rows] == [j.id for j in jobs]
    assert [r["dedupe_key"] for r in rows] == [f"good-{i}" for i in range(4)]
