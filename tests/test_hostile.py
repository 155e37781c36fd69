"""Hostile input, from both doors: the Python API and plain SQL.

Through ``enqueue``/``enqueue_many`` every bad value gets a typed error from the library's
hierarchy, nothing is written, and the caller's transaction goes on (tests/test_enqueue.py
has the basics; these are the nastier cases). Odd but valid values are stored exactly.
Through plain SQL, the table's constraints refuse what no worker could run, and they agree
with the library's own name check. Rows that pass the constraints but are bad for the worker
never crash it: a real worker drains them, the bad ones end dead with a clear last_error,
the good ones succeed, and it still stops cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

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
from outbox_worker.names import is_valid_name
from tests.conftest import WorkerProcess, wait_until
from tests.faults.harness import CALM, settle, stop_workers
from tests.faults.invariants import check_invariants
from tests.support import Enqueuer

INT32_MAX = 2**31 - 1
RTL = "\u202e"  # RIGHT-TO-LEFT OVERRIDE
ZWSP = "\u200b"  # ZERO WIDTH SPACE
ZWJ_FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # one glyph, five code points


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


def astral(n: int, seed: int = 5) -> str:
    """``n`` random characters outside the BMP: four bytes each, and incompressible."""
    rng = random.Random(seed)
    return "".join(chr(rng.randrange(0x1F300, 0x1FAFF)) for _ in range(n))


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


# ---------------------------------------------------------------------------------------------
# Plain SQL: the constraints refuse, and agree with the library's name check
# ---------------------------------------------------------------------------------------------

NAMES = [
    # refused by both
    "",
    "1a",
    "_a",
    "a b",
    "a\n",
    "a" * 129,
    "\u0435cho",
    "\uff45cho",
    "\u212aelvin",
    f"echo{ZWSP}",
    f"{RTL}echo",
    "\u0131",
    "\u00e9",
    "a\u00a0b",
    "a;b",
    "a'b",
    "a/b",
    "a*",
    # accepted by both
    "a",
    "Z",
    "a" * 128,
    "x:y.z-w_9",
    "a--",
    "A.",
    "q:",
]


async def test_the_table_and_the_library_agree_on_names(pool: asyncpg.Pool) -> None:
    disagreements = []
    for name in NAMES:
        for column in ("task", "queue"):
            refused_by: str | None = None
            try:
                await pool.execute(
                    "INSERT INTO outbox_jobs (task, queue) VALUES ($1, $2)",
                    name if column == "task" else "echo",
                    name if column == "queue" else "default",
                )
            except asyncpg.CheckViolationError as exc:
                refused_by = exc.constraint_name
            if refused_by not in (None, f"outbox_jobs_{column}_name_valid"):
                disagreements.append((column, name, f"refused by {refused_by}"))
            if (refused_by is None) != is_valid_name(name):
                disagreements.append((column, name, f"table refused by {refused_by}"))
    assert disagreements == []
    accepted = sum(is_valid_name(name) for name in NAMES)
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 2 * accepted


BAD_SQL: list[tuple[str, str, type[Exception], str | None]] = [
    (
        "state-upper-case",
        "INSERT INTO outbox_jobs (task, state) VALUES ('echo', 'QUEUED')",
        asyncpg.CheckViolationError,
        "outbox_jobs_state_valid",
    ),
    (
        "state-trailing-space",
        "INSERT INTO outbox_jobs (task, state) VALUES ('echo', 'queued ')",
        asyncpg.CheckViolationError,
        "outbox_jobs_state_valid",
    ),
    (
        "args-true",
        "INSERT INTO outbox_jobs (task, args) VALUES ('echo', 'true')",
        asyncpg.CheckViolationError,
        "outbox_jobs_args_is_object",
    ),
    (
        "args-number",
        "INSERT INTO outbox_jobs (task, args) VALUES ('echo', '1')",
        asyncpg.CheckViolationError,
        "outbox_jobs_args_is_object",
    ),
    (
        "args-sql-null",
        "INSERT INTO outbox_jobs (task, args) VALUES ('echo', NULL)",
        asyncpg.NotNullViolationError,
        None,
    ),
    (
        "args-nul-escape",
        "INSERT INTO outbox_jobs (task, args) VALUES ('echo', '{\"a\": \"\\u0000\"}')",
        asyncpg.UntranslatableCharacterError,
        None,
    ),
    (
        "task-injection-in-check",
        "INSERT INTO outbox_jobs (task) VALUES ('echo''); DROP TABLE outbox_jobs; --')",
        asyncpg.CheckViolationError,
        "outbox_jobs_task_name_valid",
    ),
    (
        "priority-over-int4",
        "INSERT INTO outbox_jobs (task, priority) VALUES ('echo', 2147483648)",
        asyncpg.NumericValueOutOfRangeError,
        None,
    ),
    (
        "max-attempts-negative",
        "INSERT INTO outbox_jobs (task, state, max_attempts) VALUES ('echo', 'dead', -5)",
        asyncpg.CheckViolationError,
        "outbox_jobs_attempts_valid",
    ),
    (
        "running-lease-but-no-worker",
        "INSERT INTO outbox_jobs (task, state, attempts, locked_until) "
        "VALUES ('echo', 'running', 1, 'infinity')",
        asyncpg.CheckViolationError,
        "outbox_jobs_running_is_locked",
    ),
    (
        # Too big for the unique index even compressed: refused, nothing half-written.
        "dedupe-key-10k-incompressible",
        f"INSERT INTO outbox_jobs (task, dedupe_key) VALUES ('echo', '{astral(2600)}')",
        asyncpg.ProgramLimitExceededError,
        None,
    ),
]


async def test_plain_sql_with_bad_values_is_refused(pool: asyncpg.Pool) -> None:
    for name, statement, error, constraint in BAD_SQL:
        with pytest.raises(error) as caught:
            await pool.execute(statement)
        if constraint is not None:
            assert getattr(caught.value, "constraint_name", None) == constraint, name
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 0
    assert await pool.fetchval("SELECT to_regclass('outbox_jobs') IS NOT NULL")


# ---------------------------------------------------------------------------------------------
# The worker and rows that pass the constraints but are bad for it
# ---------------------------------------------------------------------------------------------

# (name, task, args (JSON text), extra columns, expected state, words in last_error)
ROWS: list[tuple[str, str, str, dict[str, Any], str, list[str]]] = [
    ("unknown-task", "A:b.c-d_9", "{}", {}, "dead", ["unknown task", "A:b.c-d_9"]),
    ("unknown-lookalike", "Echo", "{}", {}, "dead", ["unknown task", "'Echo'"]),
    ("missing-arg", "takes_id", "{}", {}, "dead", ["user_id", "missing"]),
    ("extra-arg", "takes_id", '{"user_id": 1, "admin": true}', {}, "dead", ["admin"]),
    ("ctx-as-arg", "echo", '{"ctx": 1}', {}, "dead", ["ctx", "multiple values"]),
    ("number-too-long", "takes_id", '{"user_id": 1e5000}', {}, "dead", ["args", "4300"]),
    ("not-identifier-keys", "echo", '{"": 1, "a b": 2, "ü": 3}', {}, "succeeded", []),
    ("priority-max", "echo", "{}", {"priority": INT32_MAX}, "succeeded", []),
    ("priority-min", "echo", "{}", {"priority": -(2**31)}, "succeeded", []),
    ("run-at-year-1", "echo", "{}", {"run_at": "0001-01-01 00:00:00+00"}, "succeeded", []),
    ("key-10k", "echo", "{}", {"dedupe_key": "k" * 10240}, "succeeded", []),
    ("correlation-emoji", "echo", "{}", {"correlation_id": ZWJ_FAMILY + RTL}, "succeeded", []),
    (
        "correlation-log-injection",
        "echo",
        "{}",
        {"correlation_id": '"}\n{"event": "FAKE"}\nFAKE LOG LINE\x1b[2J'},
        "succeeded",
        [],
    ),
    ("huge-args", "echo", json.dumps({"blob": "x" * 3_000_000}), {}, "succeeded", []),
    ("many-keys", "echo", json.dumps({f"k{i}": i for i in range(20_000)}), {}, "succeeded", []),
    (
        "last-attempt",
        "always_fails",
        "{}",
        {"attempts": 2, "max_attempts": 3},
        "dead",
        ["ValueError"],
    ),
    ("queue-of-its-own", "echo", "{}", {"queue": "x.y:z-1"}, "succeeded", []),
]


async def _insert_row(pool: asyncpg.Pool, task: str, args: str, extra: dict[str, Any]) -> int:
    columns = ["task", "args", *extra]
    values = ["$1", "$2::jsonb"] + [
        f"${i}::text::timestamptz" if column == "run_at" else f"${i}"
        for i, column in enumerate(extra, start=3)
    ]
    job_id: int = await pool.fetchval(
        f"INSERT INTO outbox_jobs ({', '.join(columns)}) VALUES ({', '.join(values)}) RETURNING id",
        task,
        args,
        *extra.values(),
    )
    return job_id


async def test_worker_drains_rows_that_pass_the_constraints_but_are_bad(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    ids = {name: await _insert_row(pool, task, args, extra) for name, task, args, extra, *_ in ROWS}
    worker = spawn_worker(*CALM, "--queues", "default,x.y:z-1", "--concurrency", "4")
    await settle(pool, timeout=60)
    assert worker.proc.poll() is None, worker.output()[-3000:]

    rows = {
        r["id"]: r
        for r in await pool.fetch(
            "SELECT id, state, last_error, result::text AS result, args::text AS args "
            "FROM outbox_jobs"
        )
    }
    wrong = []
    for name, _, _, _, state, words in ROWS:
        row = rows[ids[name]]
        error = row["last_error"] or ""
        if row["state"] != state or not all(word in error for word in words):
            wrong.append((name, row["state"], error[:200]))
    assert wrong == []
    huge = rows[ids["huge-args"]]
    assert json.loads(huge["result"]) == json.loads(huge["args"])  # stored whole, both ways

    # The worker's log is still one JSON object per line: no forged lines.
    assert not [
        line for line in worker.output().splitlines() if "FAKE" in line and not line.startswith("{")
    ]

    await stop_workers([worker])
    await check_invariants(pool, workers=[worker], expected_ids=list(ids.values()))


async def test_args_and_results_too_deep_for_json_do_not_wedge_the_worker(
    pool: asyncpg.Pool, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """PostgreSQL stores JSON nested thousands deep; Python's json gives up near a thousand,
    with a RecursionError. A job like that must end dead, not hold its slot forever."""
    deep_args = await _insert_row(pool, "echo", '{"a": ' + "[" * 3000 + "]" * 3000 + "}", {})
    deep_result = await _insert_row(pool, "deep_result", '{"depth": 3000}', {})
    fine = await _insert_row(pool, "echo", '{"after": true}', {})
    worker = spawn_worker(*CALM, "--concurrency", "4")

    async def rows() -> list[asyncpg.Record]:
        found: list[asyncpg.Record] = await pool.fetch(
            "SELECT id, state, last_error FROM outbox_jobs ORDER BY id"
        )
        return found

    async def finished() -> bool:
        return all(r["state"] in ("succeeded", "dead") for r in await rows())

    with contextlib.suppress(pytest.fail.Exception):  # the message below says more
        await wait_until(finished, timeout=20, what="every job to finish")
    final = await rows()
    assert await finished(), f"jobs wedged: {[dict(r) for r in final]}"
    states = {r["id"]: (r["state"], r["last_error"] or "") for r in final}
    assert states[fine][0] == "succeeded"
    assert states[deep_args][0] == "dead"
    assert "deep" in states[deep_args][1] or "recursion" in states[deep_args][1].lower()
    # The handler ran; only its result cannot be stored as JSON.
    assert states[deep_result][0] in ("succeeded", "dead")
    assert worker.proc.poll() is None
    worker.signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 30) == 0
    await check_invariants(pool, workers=[worker], expected_ids=[deep_args, deep_result, fine])
