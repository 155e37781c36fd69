"""Hostile input through the Python API.

Through ``enqueue``/``enqueue_many`` every bad value gets a typed error from the library's
hierarchy, nothing is written, and the caller's transaction goes on
(tests/test_enqueue_refusals.py has the basics; these are the nastier cases). Odd but valid
values are stored exactly. Plain SQL, the other door, is in tests/test_hostile_sql.py, and
what a worker does with bad rows in tests/test_hostile_worker.py.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg

from outbox_worker import NewJob, enqueue, enqueue_many
from outbox_worker.config import MAX_DELAY_SECONDS
from outbox_worker.errors import (
    ArgsTooLarge,
    EnqueueError,
    InvalidArgs,
    InvalidName,
    InvalidOption,
    UnknownTask,
)
from outbox_worker.jobs import MAX_JSON_DEPTH
from tests.support import INT32_MAX, RTL, ZWJ_FAMILY, ZWSP, Enqueuer, astral


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def args_of_depth(depth: int) -> dict[str, Any]:
    """An args object nested ``depth`` levels deep, the object itself being the first."""
    return {"a": nested(depth - 2)}


def circular() -> dict[str, Any]:
    me: dict[str, Any] = {}
    me["me"] = me
    return me


# ---------------------------------------------------------------------------------------------
# enqueue: refused with a typed error, nothing written, the transaction goes on
# ---------------------------------------------------------------------------------------------

REFUSED: list[tuple[str, dict[str, Any], type[EnqueueError]]] = [
    # args that are not a JSON object, or not JSON at all
    ("args-true", {"args": True}, InvalidArgs),
    ("args-float", {"args": 1.5}, InvalidArgs),
    ("args-bytes", {"args": b'{"a": 1}'}, InvalidArgs),
    ("args-json-text", {"args": '{"a": 1}'}, InvalidArgs),
    ("args-pairs", {"args": [("a", 1)]}, InvalidArgs),
    ("args-none-key", {"args": {None: 1}}, InvalidArgs),
    ("args-nested-int-key", {"args": {"a": {1: "x"}}}, InvalidArgs),
    ("args-nested-colliding-keys", {"args": {"a": {1: "x", "1": "y"}}}, InvalidArgs),
    ("args-circular", {"args": circular()}, InvalidArgs),
    ("args-too-deep", {"args": {"a": nested(5000)}}, InvalidArgs),
    ("args-one-level-too-deep", {"args": args_of_depth(MAX_JSON_DEPTH + 1)}, InvalidArgs),
    ("args-too-deep-in-a-tuple", {"args": {"a": (nested(MAX_JSON_DEPTH),)}}, InvalidArgs),
    ("args-int-5000-digits", {"args": {"a": 10**5000}}, InvalidArgs),
    ("args-nul-deep", {"args": {"a": [{"b": {"c": "\x00"}}]}}, InvalidArgs),
    ("args-surrogate-key", {"args": {"\udcff": 1}}, InvalidArgs),
    ("args-surrogate-pair-halves", {"args": {"a": "\ud83d"}}, InvalidArgs),
    # over the byte limit though not over it in characters
    ("args-astral-bytes", {"args": {"a": astral(40)}, "max_args_bytes": 100}, ArgsTooLarge),
    # keys and correlation ids with NUL or that are not Unicode text
    ("key-surrogate", {"key": "k\ud800"}, InvalidOption),
    ("key-lone-low-surrogate", {"key": "\udfff"}, InvalidOption),
    ("key-not-str", {"key": 5}, InvalidOption),
    ("key-nul-only", {"key": "\x00"}, InvalidOption),
    ("key-513-astral", {"key": astral(513)}, InvalidOption),
    ("correlation-surrogate", {"correlation_id": "req-\udc80"}, InvalidOption),
    ("correlation-not-str", {"correlation_id": b"req"}, InvalidOption),
    # names: odd Unicode, NUL, injection
    ("task-surrogate", {"task": "echo\ud800"}, InvalidName),
    ("task-rtl", {"task": f"echo{RTL}"}, InvalidName),
    ("task-zero-width", {"task": f"ec{ZWSP}ho"}, InvalidName),
    ("task-cyrillic-e", {"task": "\u0435cho"}, InvalidName),
    ("task-fullwidth", {"task": "\uff45cho"}, InvalidName),
    ("task-kelvin", {"task": "\u212a"}, InvalidName),
    ("task-emoji", {"task": "echo\U0001f680"}, InvalidName),
    ("task-not-str", {"task": None}, InvalidName),
    ("task-comment", {"task": "echo--"}, UnknownTask),  # a valid name nobody registered
    ("task-union", {"task": "echo UNION SELECT 1"}, InvalidName),
    ("queue-nul", {"queue": "default\x00"}, InvalidName),
    ("queue-surrogate", {"queue": "\udbff"}, InvalidName),
    ("queue-rtl", {"queue": f"{RTL}default"}, InvalidName),
    ("queue-injection-semicolon", {"queue": "q;DELETE FROM outbox_jobs"}, InvalidName),
    # absurd delays, run_at, priorities, attempts
    ("delay-huge-int", {"delay": 10**400}, InvalidOption),
    ("delay-bool", {"delay": True}, InvalidOption),
    ("delay-timedelta-max", {"delay": timedelta.max}, InvalidOption),
    ("delay-timedelta-min", {"delay": timedelta.min}, InvalidOption),
    ("delay-just-over-max", {"delay": MAX_DELAY_SECONDS + 1}, InvalidOption),
    (
        "run-at-past-year-9999-in-utc",
        {"run_at": datetime(9999, 12, 31, 23, 59, tzinfo=timezone(timedelta(hours=-23)))},
        InvalidOption,
    ),
    (
        "run-at-before-year-1-in-utc",
        {"run_at": datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5)))},
        InvalidOption,
    ),
    ("priority-int32-min", {"priority": -(2**31)}, InvalidOption),
    ("priority-googol", {"priority": 10**100}, InvalidOption),
    ("priority-nan", {"priority": math.nan}, InvalidOption),
    ("priority-str", {"priority": "1"}, InvalidOption),
    ("max-attempts-float", {"max_attempts": 2.0}, InvalidOption),
    ("max-attempts-googol", {"max_attempts": 10**100}, InvalidOption),
]


def _refusal_problem(name: str, caught: Exception | None, error: type[EnqueueError]) -> str:
    if caught is None:
        return f"{name}: accepted"
    if not isinstance(caught, error):
        return f"{name}: {type(caught).__name__} ({str(caught)[:150]!r}), not {error.__name__}"
    if not str(caught):
        return f"{name}: {error.__name__} without a message"
    return ""


async def _job_ids(pool: asyncpg.Pool) -> list[int]:
    return [r["id"] for r in await pool.fetch("SELECT id FROM outbox_jobs ORDER BY id")]


async def test_hostile_enqueues_get_a_typed_error_and_write_nothing(
    db: Enqueuer, pool: asyncpg.Pool
) -> None:
    problems: list[str] = []
    kept: list[int] = []
    for name, kwargs, error in REFUSED:
        kept.append((await enqueue(db, "noop", {"before": name})).id)
        caught: Exception | None = None
        try:
            await enqueue(db, **{"task": "echo", "args": {"ok": 1}, **kwargs})
        except Exception as exc:  # anything but the typed error is wrong
            caught = exc
        problems.append(_refusal_problem(name, caught, error))
    # The same transaction goes on and commits every good job, and nothing else.
    kept.append((await enqueue(db, "noop", {"after": True})).id)
    await db.commit()
    assert not [p for p in problems if p], "\n".join(p for p in problems if p)
    assert await _job_ids(pool) == kept


async def test_hostile_enqueue_many_refuses_the_whole_batch(
    db: Enqueuer, pool: asyncpg.Pool
) -> None:
    problems: list[str] = []
    for name, kwargs, error in REFUSED:
        options = {k: v for k, v in kwargs.items() if k != "max_args_bytes"}
        limit = kwargs.get("max_args_bytes")
        try:
            bad = NewJob(**{"task": "echo", "args": {"ok": 1}, **options})
        except TypeError:
            continue  # not a NewJob field
        batch = [NewJob("noop", key=f"{name}-{i}") for i in range(3)]
        batch.insert(2, bad)
        caught: Exception | None = None
        try:
            await enqueue_many(db, batch, max_args_bytes=limit)
        except Exception as exc:  # anything but the typed error is wrong
            caught = exc
        problems.append(_refusal_problem(name, caught, error))
    good = await enqueue_many(db, [NewJob("noop", key=f"good-{i}") for i in range(3)])
    await db.commit()
    assert not [p for p in problems if p], "\n".join(p for p in problems if p)
    assert await _job_ids(pool) == [job.id for job in good]


# ---------------------------------------------------------------------------------------------
# enqueue: odd but valid values are stored exactly as given
# ---------------------------------------------------------------------------------------------

INJECTION = "'); DROP TABLE outbox_jobs; --"
ODD_TEXTS = [
    f"{RTL}gnp.exe",
    f"k{ZWSP}ey",
    ZWJ_FAMILY,
    "e\u0301",  # NFD é
    "\u00e9",  # NFC é
    "\ufeffbom",
    "\\u0000",  # a backslash and 'u0000', not a NUL
    INJECTION,
    "\x1b[31mred\nFAKE LOG LINE",
    astral(512),  # the longest key: 2 KiB of UTF-8 that no compression shrinks
]


async def test_odd_but_valid_values_are_stored_exactly(db: Enqueuer, pool: asyncpg.Pool) -> None:
    jobs = []
    for i, text_value in enumerate(ODD_TEXTS):
        args = {text_value: text_value, "nested": {text_value: [text_value, i]}}
        correlation = text_value[:255]
        jobs.append(await enqueue(db, "echo", args, key=text_value, correlation_id=correlation))
    extremes = [
        await enqueue(db, "echo", key="p-max", priority=INT32_MAX),
        await enqueue(db, "echo", key="p-min", priority=-INT32_MAX),
        await enqueue(db, "echo", key="d-max", delay=MAX_DELAY_SECONDS),
        await enqueue(db, "echo", key="d-neg-zero", delay=-0.0),
        await enqueue(db, "echo", key="year-1", run_at=datetime(1, 1, 1, 1, tzinfo=UTC)),
        await enqueue(db, "echo", key="int-4000", args={"n": 10**4000}),
        await enqueue(db, "echo", key="deepest", args=args_of_depth(MAX_JSON_DEPTH)),
    ]
    await db.commit()
    assert not any(job.duplicate for job in jobs + extremes)
    # Keys that differ only by a zero-width character or a normal form are different keys.
    assert len({job.id for job in jobs}) == len(ODD_TEXTS)

    rows = {
        r["id"]: r
        for r in await pool.fetch(
            "SELECT id, dedupe_key, correlation_id, args::text AS args, priority, run_at "
            "FROM outbox_jobs"
        )
    }
    for job, text_value in zip(jobs, ODD_TEXTS, strict=True):
        row = rows[job.id]
        assert row["dedupe_key"] == text_value
        assert row["correlation_id"] == text_value[:255]
        assert json.loads(row["args"]) == {
            text_value: text_value,
            "nested": {text_value: [text_value, ODD_TEXTS.index(text_value)]},
        }
    assert rows[extremes[0].id]["priority"] == INT32_MAX
    assert rows[extremes[1].id]["priority"] == -INT32_MAX
    assert rows[extremes[4].id]["run_at"] == datetime(1, 1, 1, 1, tzinfo=UTC)
    assert json.loads(rows[extremes[5].id]["args"]) == {"n": 10**4000}
    assert json.loads(rows[extremes[6].id]["args"]) == args_of_depth(MAX_JSON_DEPTH)
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == len(rows)
