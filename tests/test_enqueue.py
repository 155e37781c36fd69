"""enqueue / enqueue_many through the caller's SQLAlchemy transaction, on a real PostgreSQL.

Every check of a returned Job is also made against the row as another connection reads it,
so a Job that disagrees with the table fails.
"""

from __future__ import annotations

import gc
import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from outbox_worker import (
    ArgsTooLarge,
    EnqueueError,
    InvalidArgs,
    InvalidName,
    InvalidOption,
    Job,
    JobContext,
    JobState,
    NewJob,
    OutboxError,
    Registry,
    TaskDefinitionError,
    UnknownTask,
    current_correlation_id,
    enqueue,
    enqueue_many,
)
from outbox_worker.enqueue_checks import ENCODER, _least_size
from tests.support import Enqueuer
from tests.workload import registry

MIB = 1024 * 1024


async def job_rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    """Every committed row, as a separate connection sees it."""
    return list(await pool.fetch("SELECT *, args::text AS args_text FROM outbox_jobs ORDER BY id"))


async def db_now(db: Enqueuer) -> datetime:
    """The transaction's now(), which the insert uses for run_at and created_at."""
    value = (await db.execute(text("SELECT now()"))).scalar_one()
    assert isinstance(value, datetime)
    return value


def assert_job_matches_row(job: Job, row: asyncpg.Record) -> None:
    assert job.id == row["id"]
    assert job.queue == row["queue"]
    assert job.task == row["task"]
    assert job.args == json.loads(row["args_text"])
    assert job.state == row["state"]
    assert job.priority == row["priority"]
    assert job.attempts == row["attempts"]
    assert job.max_attempts == row["max_attempts"]
    assert job.run_at == row["run_at"]
    assert job.dedupe_key == row["dedupe_key"]
    assert job.correlation_id == row["correlation_id"]
    assert job.created_at == row["created_at"]


# ---------------------------------------------------------------------------------------------
# Atomicity: the job exists iff the caller's transaction commits
# ---------------------------------------------------------------------------------------------


async def test_rolled_back_enqueue_leaves_no_job(db: Enqueuer, pool: asyncpg.Pool) -> None:
    job = await enqueue(db, "echo", {"n": 1})
    many = await enqueue_many(db, [NewJob("echo", {"n": 2}), NewJob("noop")])
    assert job.id > 0
    assert len(many) == 2
    await db.rollback()
    assert await job_rows(pool) == []


async def test_closing_without_commit_leaves_no_job(
    engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    async with AsyncSession(engine) as session:
        await enqueue(session, "echo", {"via": "session"})
    async with engine.connect() as conn:
        await enqueue(conn, "echo", {"via": "connection"})
    assert await job_rows(pool) == []


async def test_domain_row_and_job_commit_together_or_not_at_all(
    db: Enqueuer, pool: asyncpg.Pool
) -> None:
    await db.execute(text("CREATE TABLE domain_orders (id integer PRIMARY KEY, note text)"))
    await db.commit()

    await db.execute(text("INSERT INTO domain_orders VALUES (1, 'rolled back')"))
    await enqueue(db, "echo", {"order_id": 1})
    await db.rollback()
    assert await pool.fetch("SELECT id FROM domain_orders") == []
    assert await job_rows(pool) == []

    await db.execute(text("INSERT INTO domain_orders VALUES (2, 'committed')"))
    job = await enqueue(db, "echo", {"order_id": 2})
    await db.commit()
    orders = await pool.fetch("SELECT id, note FROM domain_orders")
    assert [(r["id"], r["note"]) for r in orders] == [(2, "committed")]
    rows = await job_rows(pool)
    assert [r["id"] for r in rows] == [job.id]
    assert json.loads(rows[0]["args_text"]) == {"order_id": 2}


async def test_enqueue_never_commits(db: Enqueuer, pool: asyncpg.Pool) -> None:
    job = await enqueue(db, "echo", {"n": 1})
    many = await enqueue_many(db, [NewJob("noop"), NewJob("echo", {"n": 2})])
    assert db.in_transaction()
    # Another connection sees nothing while the caller's transaction is open.
    assert await job_rows(pool) == []
    # The caller's own transaction sees its rows.
    own = (await db.execute(text("SELECT count(*) FROM outbox_jobs"))).scalar_one()
    assert own == 3
    await db.commit()
    assert [r["id"] for r in await job_rows(pool)] == [job.id, *(j.id for j in many)]


# ---------------------------------------------------------------------------------------------
# The returned Job
# ---------------------------------------------------------------------------------------------


async def test_returned_job_is_the_new_row(db: Enqueuer, pool: asyncpg.Pool) -> None:
    now = await db_now(db)
    job = await enqueue(db, "echo", {"user_id": 42})
    await db.commit()

    assert isinstance(job, Job)
    assert job.task == "echo"
    assert job.queue == "default"
    assert job.args == {"user_id": 42}
    assert job.state is JobState.QUEUED
    assert job.priority == 0
    assert job.attempts == 0
    assert job.max_attempts == 5
    assert job.run_at == now
    assert job.created_at == now
    assert job.dedupe_key is None
    assert job.correlation_id is None
    assert job.last_error is None
    assert job.result is None
    assert job.locked_by is None
    assert job.locked_until is None
    assert job.started_at is None
    assert job.finished_at is None
    assert job.duplicate is False
    rows = await job_rows(pool)
    assert len(rows) == 1
    assert_job_matches_row(job, rows[0])


async def test_args_none_is_an_empty_object(db: Enqueuer, pool: asyncpg.Pool) -> None:
    job = await enqueue(db, "noop")
    explicit = await enqueue(db, "noop", None)
    await db.commit()
    assert job.args == {}
    assert explicit.args == {}
    assert [r["args_text"] for r in await job_rows(pool)] == ["{}", "{}"]


async def test_queue_is_the_tasks_unless_overridden(db: Enqueuer, pool: asyncpg.Pool) -> None:
    task_default = await enqueue(db, "sleepy", {"seconds": 0})  # registered with queue="slow"
    plain_default = await enqueue(db, "echo")
    override = await enqueue(db, "sleepy", {"seconds": 0}, queue="reports.v2:eu-1")
    longest = await enqueue(db, "echo", queue="q" * 128)
    await db.commit()
    assert task_default.queue == "slow"
    assert plain_default.queue == "default"
    assert override.queue == "reports.v2:eu-1"
    assert longest.queue == "q" * 128
    queues = [r["queue"] for r in await job_rows(pool)]
    assert queues == ["slow", "default", "reports.v2:eu-1", "q" * 128]


async def test_priority_default_and_override(db: Enqueuer, pool: asyncpg.Pool) -> None:
    jobs = [
        await enqueue(db, "echo"),
        await enqueue(db, "echo", priority=7),
        await enqueue(db, "echo", priority=-3),
        await enqueue(db, "echo", priority=2**31 - 1),
        await enqueue(db, "echo", priority=-(2**31 - 1)),
    ]
    await db.commit()
    expected = [0, 7, -3, 2**31 - 1, -(2**31 - 1)]
    assert [j.priority for j in jobs] == expected
    assert [r["priority"] for r in await job_rows(pool)] == expected


async def test_max_attempts_task_default_override_and_column_default(
    db: Enqueuer, pool: asyncpg.Pool
) -> None:
    spec = registry.get("always_fails")
    assert spec is not None
    assert spec.max_attempts == 3  # a task default that differs from the column default
    task_default = await enqueue(db, "always_fails")
    override = await enqueue(db, "always_fails", max_attempts=9)
    one = await enqueue(db, "always_fails", max_attempts=1)
    await db.commit()
    plain_id = await pool.fetchval(
        "INSERT INTO outbox_jobs (task, args) VALUES ('always_fails', '{}') RETURNING id"
    )

    assert task_default.max_attempts == 3
    assert override.max_attempts == 9
    assert one.max_attempts == 1
    by_id = {r["id"]: r["max_attempts"] for r in await job_rows(pool)}
    assert by_id == {task_default.id: 3, override.id: 9, one.id: 1, plain_id: 5}


async def test_plain_sql_insert_gets_column_defaults(pool: asyncpg.Pool) -> None:
    row = await pool.fetchrow(
        "INSERT INTO outbox_jobs (task) VALUES ('echo') "
        "RETURNING queue, args::text AS args_text, state, priority, attempts, max_attempts, "
        "run_at = now() AS run_now, dedupe_key, correlation_id"
    )
    assert dict(row) == {
        "queue": "default",
        "args_text": "{}",
        "state": "queued",
        "priority": 0,
        "attempts": 0,
        "max_attempts": 5,
        "run_now": True,
        "dedupe_key": None,
        "correlation_id": None,
    }


@pytest.mark.parametrize(
    ("delay", "expected"),
    [
        (30, timedelta(seconds=30)),
        (1.5, timedelta(seconds=1.5)),
        (0, timedelta(0)),
        (timedelta(minutes=5, milliseconds=250), timedelta(minutes=5, milliseconds=250)),
        (timedelta(days=400), timedelta(days=400)),
    ],
    ids=["int-seconds", "float-seconds", "zero", "timedelta", "timedelta-days"],
)
async def test_delay_sets_run_at_from_the_database_clock(
    db: Enqueuer, pool: asyncpg.Pool, delay: float | timedelta, expected: timedelta
) -> None:
    now = await db_now(db)  # constant for the whole transaction
    job = await enqueue(db, "echo", delay=delay)
    [many] = await enqueue_many(db, [NewJob("echo", delay=delay)])
    await db.commit()
    assert job.run_at == now + expected
    assert many.run_at == now + expected
    assert job.created_at == now
    assert [r["run_at"] for r in await job_rows(pool)] == [now + expected, now + expected]


@pytest.mark.parametrize(
    "run_at",
    [
        datetime(2031, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2030, 6, 1, 12, 0, tzinfo=UTC),
        datetime(2001, 1, 1, tzinfo=timezone(timedelta(hours=-8))),  # in the past: due now
    ],
    ids=["future-offset", "future-utc", "past"],
)
async def test_run_at_is_stored_as_given(
    db: Enqueuer, pool: asyncpg.Pool, run_at: datetime
) -> None:
    job = await enqueue(db, "echo", run_at=run_at)
    [many] = await enqueue_many(db, [NewJob("noop", run_at=run_at)])
    await db.commit()
    assert job.run_at == run_at
    assert many.run_at == run_at
    assert [r["run_at"] for r in await job_rows(pool)] == [run_at, run_at]


async def test_correlation_id_explicit(db: Enqueuer, pool: asyncpg.Pool) -> None:
    assert current_correlation_id.get() is None
    job = await enqueue(db, "echo", correlation_id="req-explicit-1")
    none = await enqueue(db, "echo")
    await db.commit()
    assert job.correlation_id == "req-explicit-1"
    assert none.correlation_id is None
    assert [r["correlation_id"] for r in await job_rows(pool)] == ["req-explicit-1", None]


async def test_correlation_id_from_the_contextvar(
    db: Enqueuer, pool: asyncpg.Pool, correlation: str
) -> None:
    implicit = await enqueue(db, "echo")
    explicit = await enqueue(db, "echo", correlation_id="req-other")
    many = await enqueue_many(db, [NewJob("noop"), NewJob("noop", correlation_id="req-x")])
    await db.commit()
    assert implicit.correlation_id == correlation
    assert explicit.correlation_id == "req-other"
    assert [j.correlation_id for j in many] == [correlation, "req-x"]
    stored = [r["correlation_id"] for r in await job_rows(pool)]
    assert stored == [correlation, "req-other", correlation, "req-x"]


ROUND_TRIP_ARGS: list[dict[str, Any]] = [
    {},
    {"user_id": 42},
    {
        "text": "héllo wörld — ✓ 😀 中文",
        "empty": "",
        "quote": 'it\'s "quoted" \\ backslash\nnewline\ttab',
        "int": -17,
        "big": 2**70,
        "float": 1.5,
        "small": 0.001,
        "true": True,
        "false": False,
        "null": None,
        "list": [1, "two", [3, {"four": 4}], None],
        "nested": {"a": {"b": {"c": []}}},
        "sql": "'; DROP TABLE outbox_jobs; --",
    },
    {"😀 key": 1, "": "empty key", "a.b:c": {"x-y": [True]}},
]


@pytest.mark.parametrize("args", ROUND_TRIP_ARGS, ids=["empty", "simple", "mixed", "keys"])
async def test_args_round_trip(db: Enqueuer, pool: asyncpg.Pool, args: dict[str, Any]) -> None:
    job = await enqueue(db, "echo", args)
    [many] = await enqueue_many(db, [NewJob("echo", args)])
    await db.commit()
    assert job.args == args
    assert many.args == args
    assert [json.loads(r["args_text"]) for r in await job_rows(pool)] == [args, args]


async def test_args_with_backslash_u0000_text_round_trip(db: Enqueuer, pool: asyncpg.Pool) -> None:
    """A literal backslash followed by ``u0000`` is ordinary text, not a NUL character;
    jsonb stores it fine, so enqueue must accept it."""
    args = {"path": "C:\\u0000\\dir", "pattern": "\\u0000"}
    assert "\x00" not in json.dumps(args, ensure_ascii=False)
    job = await enqueue(db, "echo", args)
    await db.commit()
    assert job.args == args
    assert [json.loads(r["args_text"]) for r in await job_rows(pool)] == [args]


# ---------------------------------------------------------------------------------------------
# enqueue_many
# ---------------------------------------------------------------------------------------------


async def test_enqueue_many_writes_in_one_statement_in_input_order(
    db: Enqueuer, engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    single = await enqueue(db, "noop")
    statements: list[str] = []

    def record(
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        if "outbox_jobs" in statement:
            statements.append(statement)

    inputs = [
        NewJob("echo", {"i": 0}),
        NewJob("noop"),
        NewJob("takes_id", {"user_id": 7}),
        NewJob("echo", {"i": 3}),
        NewJob("sleepy", {"seconds": 0}),
    ]
    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        jobs = await enqueue_many(db, inputs)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)
    await db.commit()

    assert len(statements) == 1
    assert [(j.task, j.args) for j in jobs] == [(n.task, dict(n.args)) for n in inputs]
    assert [j.duplicate for j in jobs] == [False] * len(inputs)
    ids = [j.id for j in jobs]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    rows = await job_rows(pool)
    assert [r["id"] for r in rows] == [single.id, *ids]
    for job, row in zip(jobs, rows[1:], strict=True):
        assert_job_matches_row(job, row)
    # The database agrees: the rows of the call share one command id, unlike the single one.
    cmins = await pool.fetch("SELECT id, cmin::text::int AS cmin FROM outbox_jobs ORDER BY id")
    assert len({r["cmin"] for r in cmins[1:]}) == 1
    assert cmins[0]["cmin"] != cmins[1]["cmin"]


async def test_enqueue_many_a_thousand_jobs(db: Enqueuer, pool: asyncpg.Pool) -> None:
    inputs = [NewJob("echo", {"i": i}, priority=i % 7) for i in range(1000)]
    jobs = await enqueue_many(db, inputs)
    await db.commit()
    assert len(jobs) == 1000
    assert [j.args["i"] for j in jobs] == list(range(1000))
    assert [j.priority for j in jobs] == [i % 7 for i in range(1000)]
    assert all(not j.duplicate for j in jobs)
    rows = await job_rows(pool)
    assert len(rows) == 1000
    assert {r["id"]: json.loads(r["args_text"])["i"] for r in rows} == {
        j.id: j.args["i"] for j in jobs
    }


async def test_enqueue_many_mixed_tasks_and_options(
    db: Enqueuer, pool: asyncpg.Pool, correlation: str
) -> None:
    now = await db_now(db)
    at = datetime(2032, 2, 29, 23, 59, 59, tzinfo=timezone(timedelta(hours=2)))
    inputs = [
        NewJob("echo", {"a": 1}),
        NewJob("sleepy", {"seconds": 0.1}, queue="other", priority=5),
        NewJob("always_fails", max_attempts=8, delay=60),
        NewJob("flaky", {"failures": 2}, key="flaky-1", run_at=at),
        NewJob("takes_id", {"user_id": 3}, correlation_id="req-mixed", delay=timedelta(hours=1)),
        NewJob("always_fails"),
    ]
    jobs = await enqueue_many(db, inputs)
    await db.commit()

    assert [j.task for j in jobs] == [n.task for n in inputs]
    assert [j.args for j in jobs] == [dict(n.args) for n in inputs]
    assert [j.queue for j in jobs] == [
        "default",
        "other",
        "default",
        "default",
        "default",
        "default",
    ]
    assert [j.priority for j in jobs] == [0, 5, 0, 0, 0, 0]
    assert [j.max_attempts for j in jobs] == [5, 5, 8, 5, 5, 3]
    assert [j.run_at for j in jobs] == [
        now,
        now,
        now + timedelta(seconds=60),
        at,
        now + timedelta(hours=1),
        now,
    ]
    assert [j.dedupe_key for j in jobs] == [None, None, None, "flaky-1", None, None]
    assert [j.correlation_id for j in jobs] == [
        correlation,
        correlation,
        correlation,
        correlation,
        "req-mixed",
        correlation,
    ]
    assert all(j.state is JobState.QUEUED and not j.duplicate for j in jobs)
    rows = await job_rows(pool)
    assert len(rows) == len(jobs)
    for job, row in zip(jobs, rows, strict=True):
        assert_job_matches_row(job, row)


@pytest.mark.parametrize(
    "odd_one_out",
    [
        pytest.param(None, id="alike-but-args"),
        pytest.param(NewJob("echo", {"i": 99}, priority=5), id="one-other-priority"),
        pytest.param(NewJob("echo", {"i": 99}, delay=30), id="one-other-delay"),
        pytest.param(NewJob("echo", {"i": 99}, queue="other"), id="one-other-queue"),
        pytest.param(NewJob("echo", {"i": 99}, correlation_id="req-odd"), id="one-other-id"),
    ],
)
async def test_enqueue_many_of_jobs_alike_returns_the_rows_written(
    db: Enqueuer, pool: asyncpg.Pool, odd_one_out: NewJob | None
) -> None:
    """A batch of one task's jobs that differ only in args takes a shorter statement; one
    job that differs in anything else sends the batch down the general one. Either way the
    returned Jobs are the rows, in input order."""
    now = await db_now(db)
    inputs = [NewJob("echo", {"i": i, "name": f"ü-{i}"}, delay=2) for i in range(40)]
    if odd_one_out is not None:
        inputs.insert(17, odd_one_out)
    token = current_correlation_id.set("req-batch")
    try:
        jobs = await enqueue_many(db, inputs)
    finally:
        current_correlation_id.reset(token)
    await db.commit()

    rows = await job_rows(pool)
    assert [j.id for j in jobs] == [r["id"] for r in rows]
    for job, row in zip(jobs, rows, strict=True):
        assert_job_matches_row(job, row)
        assert (job.state, job.attempts, job.duplicate) == (JobState.QUEUED, 0, False)
    assert [j.args for j in jobs] == [dict(n.args) for n in inputs]
    alike = [j for n, j in zip(inputs, jobs, strict=True) if n is not odd_one_out]
    assert {(j.queue, j.priority, j.run_at, j.correlation_id) for j in alike} == {
        ("default", 0, now + timedelta(seconds=2), "req-batch")
    }


async def test_enqueue_many_of_nothing(db: Enqueuer, pool: asyncpg.Pool) -> None:
    assert await enqueue_many(db, []) == []
    await db.commit()
    assert await job_rows(pool) == []


def test_task_names_resolve_in_any_live_registry_and_die_with_theirs() -> None:
    """Registries are found by name without walking all of them, yet a name whose registry
    was dropped is unknown again unless another live registry has it."""

    async def short_lived(ctx: JobContext) -> None:
        return None

    def queue_of(name: str) -> str | None:
        spec = Registry.find(name)
        return None if spec is None else spec.queue

    first, second = Registry(), Registry()
    first.add(short_lived, name="short_lived_task")
    second.add(short_lived, name="short_lived_task", queue="second")
    assert queue_of("short_lived_task") == "second"  # the last one added
    del second
    gc.collect()
    assert queue_of("short_lived_task") == "default"  # found in the one left
    del first
    gc.collect()
    assert queue_of("short_lived_task") is None


# ---------------------------------------------------------------------------------------------
# Refused input: a typed error, nothing written, the caller's transaction still usable
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The size limit
# ---------------------------------------------------------------------------------------------


def args_of_size(size: int) -> dict[str, str]:
    """Args whose compact JSON form is exactly ``size`` bytes."""
    overhead = len(json.dumps({"p": ""}, separators=(",", ":")))
    args = {"p": "x" * (size - overhead)}
    assert len(json.dumps(args, separators=(",", ":")).encode()) == size
    return args


async def test_size_limit_per_call(db: Enqueuer, pool: asyncpg.Pool) -> None:
    at_limit = await enqueue(db, "echo", args_of_size(100), max_args_bytes=100)
    with pytest.raises(ArgsTooLarge):
        await enqueue(db, "echo", args_of_size(101), max_args_bytes=100)
    [many] = await enqueue_many(db, [NewJob("echo", args_of_size(100))], max_args_bytes=100)
    with pytest.raises(ArgsTooLarge):
        await enqueue_many(db, [NewJob("echo", args_of_size(101))], max_args_bytes=100)
    await db.commit()
    assert [r["id"] for r in await job_rows(pool)] == [at_limit.id, many.id]


async def test_args_that_share_a_list_are_measured_before_they_are_encoded(
    db: Enqueuer, pool: asyncpg.Pool
) -> None:
    """Sixty levels of a list that holds the level below twice: 2**60 elements once
    encoded. Refused by their size without encoding them, where json.dumps would run for
    ever; a small structure shared a few times is stored expanded."""
    shared: list[Any] = []
    for _ in range(60):
        shared = [shared, shared]
    with pytest.raises(ArgsTooLarge, match="the limit is"):
        await enqueue(db, "echo", {"tree": shared})
    with pytest.raises(ArgsTooLarge):
        await enqueue_many(db, [NewJob("echo", {"tree": shared})])
    leaf = {"k": [1, 2]}
    job = await enqueue(db, "echo", {"a": leaf, "b": [leaf, leaf]})
    await db.commit()
    [row] = await job_rows(pool)
    assert json.loads(row["args_text"]) == job.args == {"a": leaf, "b": [leaf, leaf]}


_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
_SCALAR = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
)
_JSON = st.recursive(
    _SCALAR | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(_TEXT, _JSON, max_size=4))
def test_the_size_measured_first_never_exceeds_the_encoded_size(args: dict[str, Any]) -> None:
    """So args within the limit are never refused by the measure taken before encoding."""
    assert _least_size(args, {}) <= len(ENCODER.encode(args).encode())


async def test_default_size_limit_is_one_mebibyte(
    db: Enqueuer, pool: asyncpg.Pool, default_settings: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ArgsTooLarge):
        await enqueue(db, "echo", args_of_size(int(1.1 * MIB)))
    with pytest.raises(ArgsTooLarge):
        await enqueue(db, "echo", args_of_size(MIB + 1))
    with pytest.raises(ArgsTooLarge):
        await enqueue_many(db, [NewJob("noop"), NewJob("echo", args_of_size(MIB + 1))])
    job = await enqueue(db, "echo", args_of_size(MIB))
    await db.commit()
    rows = await job_rows(pool)
    assert [r["id"] for r in rows] == [job.id]
    assert len(rows[0]["args_text"]) >= MIB - 16  # stored whole (jsonb text adds spaces)


async def test_size_limit_from_the_environment(
    db: Enqueuer, pool: asyncpg.Pool, default_settings: pytest.MonkeyPatch
) -> None:
    default_settings.setenv("OUTBOX_MAX_ARGS_BYTES", "64")
    with pytest.raises(ArgsTooLarge):
        await enqueue(db, "echo", args_of_size(65))
    job = await enqueue(db, "echo", args_of_size(64))
    await db.commit()
    assert [r["id"] for r in await job_rows(pool)] == [job.id]


# ---------------------------------------------------------------------------------------------
# The table's CHECK constraints refuse bad plain-SQL inserts
# ---------------------------------------------------------------------------------------------

BAD_INSERTS: list[tuple[str, str, str]] = [
    (
        "bad-state",
        "INSERT INTO outbox_jobs (task, state) VALUES ('echo', 'pending')",
        "outbox_jobs_state_valid",
    ),
    (
        "bad-task-name",
        "INSERT INTO outbox_jobs (task) VALUES ('echo; DROP TABLE outbox_jobs')",
        "outbox_jobs_task_name_valid",
    ),
    (
        "empty-task-name",
        "INSERT INTO outbox_jobs (task) VALUES ('')",
        "outbox_jobs_task_name_valid",
    ),
    (
        "task-name-newline",
        "INSERT INTO outbox_jobs (task) VALUES (E'echo\\n')",
        "outbox_jobs_task_name_valid",
    ),
    (
        "task-name-too-long",
        f"INSERT INTO outbox_jobs (task) VALUES ('{'a' * 129}')",
        "outbox_jobs_task_name_valid",
    ),
    (
        "bad-queue-name",
        "INSERT INTO outbox_jobs (task, queue) VALUES ('echo', '1 queue')",
        "outbox_jobs_queue_name_valid",
    ),
    (
        "args-array",
        "INSERT INTO outbox_jobs (task, args) VALUES ('echo', '[1, 2]')",
        "outbox_jobs_args_is_object",
    ),
    (
        "args-string",
        "INSERT INTO outbox_jobs (task, args) VALUES ('echo', '\"x\"')",
        "outbox_jobs_args_is_object",
    ),
    (
        "args-json-null",
        "INSERT INTO outbox_jobs (task, args) VALUES ('echo', 'null')",
        "outbox_jobs_args_is_object",
    ),
    (
        "attempts-over-max",
        "INSERT INTO outbox_jobs (task, state, attempts, max_attempts) "
        "VALUES ('echo', 'dead', 6, 5)",
        "outbox_jobs_attempts_valid",
    ),
    (
        "attempts-negative",
        "INSERT INTO outbox_jobs (task, attempts) VALUES ('echo', -1)",
        "outbox_jobs_attempts_valid",
    ),
    (
        "max-attempts-zero",
        "INSERT INTO outbox_jobs (task, state, max_attempts) VALUES ('echo', 'dead', 0)",
        "outbox_jobs_attempts_valid",
    ),
    (
        "queued-without-attempts-left",
        "INSERT INTO outbox_jobs (task, state, attempts, max_attempts) "
        "VALUES ('echo', 'queued', 5, 5)",
        "outbox_jobs_queued_has_attempts_left",
    ),
    *(
        (
            f"run-at-{name}",
            f"INSERT INTO outbox_jobs (task, run_at) VALUES ('echo', '{value}')",
            "outbox_jobs_run_at_readable",
        )
        for name, value in [
            ("bc", "0001-12-31 23:59:59 BC"),
            ("earliest-postgres-takes", "4713-01-01 00:00:00+00 BC"),
            ("year-10000", "10000-01-01 00:00:00+00"),
            ("infinity", "infinity"),
            ("minus-infinity", "-infinity"),
            ("just-before-year-1-utc", "0001-01-01 00:00:00+01"),
        ]
    ),
    (
        "running-without-locked-by",
        "INSERT INTO outbox_jobs (task, state, attempts, locked_until) "
        "VALUES ('echo', 'running', 1, now() + interval '30 seconds')",
        "outbox_jobs_running_is_locked",
    ),
    (
        "running-without-locked-until",
        "INSERT INTO outbox_jobs (task, state, attempts, locked_by) "
        "VALUES ('echo', 'running', 1, 'worker-1')",
        "outbox_jobs_running_is_locked",
    ),
]


@pytest.mark.parametrize(
    ("statement", "constraint"),
    [(statement, constraint) for _, statement, constraint in BAD_INSERTS],
    ids=[name for name, _, _ in BAD_INSERTS],
)
async def test_check_constraints_refuse_bad_plain_inserts(
    pool: asyncpg.Pool, statement: str, constraint: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await pool.execute(statement)
    assert caught.value.constraint_name == constraint
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == 0


async def test_check_constraints_accept_valid_plain_inserts(pool: asyncpg.Pool) -> None:
    """The control for the refusals above: the edge values that are allowed go in."""
    await pool.execute(
        """
        INSERT INTO outbox_jobs (task, queue, args, state, attempts, max_attempts,
                                 locked_by, locked_until)
        VALUES ('echo', 'default', '{}', 'queued', 4, 5, NULL, NULL),
               ('echo', 'q', '{"a": [1]}', 'dead', 5, 5, NULL, NULL),
               ('echo', 'Q.1:x-y_z', '{}', 'running', 1, 1, 'worker-1',
                now() + interval '30 seconds'),
               ('echo', 'default', '{}', 'succeeded', 1, 5, NULL, NULL),
               ('echo', 'default', '{}', 'cancelled', 0, 5, NULL, NULL)
        """
    )
    states = [r["state"] for r in await pool.fetch("SELECT state FROM outbox_jobs ORDER BY id")]
    assert states == ["queued", "dead", "running", "succeeded", "cancelled"]


def test_a_task_decorator_written_without_parentheses_registers_the_task() -> None:
    """``@registry.task`` bare, as Celery and procrastinate allow, registers like
    ``@registry.task()``; it used to register nothing, and the worker then buried every job
    of the task as unknown."""
    registry = Registry()

    @registry.task
    async def bare(ctx: JobContext, n: int) -> int:
        return n

    @registry.task()
    async def called(ctx: JobContext) -> None:
        return None

    @registry.task("named", queue="elsewhere")
    async def renamed(ctx: JobContext) -> None:
        return None

    assert sorted(spec.name for spec in registry) == ["bare", "called", "named"]
    assert registry.get("named") is not None
    assert registry.get("named").queue == "elsewhere"  # type: ignore[union-attr]
    assert bare.__name__ == "bare"  # the decorator hands the function back
    with pytest.raises(TaskDefinitionError, match="text"):
        registry.task(42)  # type: ignore[call-overload]
