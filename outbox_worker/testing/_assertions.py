"""assert_enqueued, refute_enqueued and clear_jobs, and the plans they run. A plan is the
same whatever session runs it, so ``sync.py`` runs these very plans on a sync session, with
the same search and the same failure messages."""

from __future__ import annotations

import json
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, NamedTuple

from outbox_worker import drivers, sql
from outbox_worker.client import AsyncSessionLike
from outbox_worker.enqueue_plans import Plan
from outbox_worker.errors import WrongSession
from outbox_worker.jobs import JOB_COLUMNS, Job, JobState

# How many jobs a failed assertion lists (the newest), so that a full table stays readable.
SHOWN_JOBS = 20


def assert_enqueued(
    session: AsyncSessionLike,
    task: str,
    args: Mapping[str, Any] | None = None,
    *,
    count: int | None = None,
    queue: str | None = None,
    state: JobState | str | None = None,
    priority: int | None = None,
    max_attempts: int | None = None,
    key: str | None = None,
    correlation_id: str | None = None,
) -> Coroutine[Any, Any, list[Job]]:
    """The jobs of ``task`` that match, oldest first; AssertionError if there is none (or,
    with ``count``, not exactly that many), listing the jobs there are. Awaited.

    ``args`` matches when the job's args contain it (jsonb ``@>``: ``{"user_id": 1}`` matches
    ``{"user_id": 1, "lang": "en"}``). Every other filter is a column, compared for equality
    (``key`` is ``dedupe_key``); one left at None matches anything. Any state matches unless
    ``state`` is given. Read through ``session``, any async session or connection enqueue
    takes, in its transaction: the jobs that transaction enqueued count before they are
    committed. A sync session (WrongSession: see outbox_worker.testing.sync) or a state that
    does not exist (ValueError) is refused by the call itself, awaited or not.
    """
    runner = _async_runner(session, "assert_enqueued")
    search = _search(
        task,
        args,
        queue=queue,
        state=state,
        priority=priority,
        max_attempts=max_attempts,
        key=key,
        correlation_id=correlation_id,
    )
    return runner(session, _expect(search, count))


def refute_enqueued(
    session: AsyncSessionLike,
    task: str,
    args: Mapping[str, Any] | None = None,
    *,
    queue: str | None = None,
    state: JobState | str | None = None,
    priority: int | None = None,
    max_attempts: int | None = None,
    key: str | None = None,
    correlation_id: str | None = None,
) -> Coroutine[Any, Any, None]:
    """AssertionError, listing the matches, if any job matches; the session and filters are
    those of :func:`assert_enqueued`. Awaited."""
    runner = _async_runner(session, "refute_enqueued")
    search = _search(
        task,
        args,
        queue=queue,
        state=state,
        priority=priority,
        max_attempts=max_attempts,
        key=key,
        correlation_id=correlation_id,
    )
    return runner(session, _refute(search))


def clear_jobs(session: AsyncSessionLike) -> Coroutine[Any, Any, int]:
    """Delete every job, in the session's transaction (it never commits); returns how many.
    Awaited.

    For a clean queue per test when the tests share a database (see docs/testing.md). On a
    raw connection outside a transaction the DELETE is a transaction of its own, committed
    at once as every statement there is: what a fixture emptying the table wants."""
    return _async_runner(session, "clear_jobs")(session, _clear())


def _async_runner(session: object, function: str) -> drivers.AsyncRunner:
    runner = drivers.async_runner_unchecked(session)
    if runner is None:
        raise WrongSession(_refusal(session, function, sync=False))
    return runner


def _refusal(session: object, function: str, *, sync: bool) -> str:
    """Why ``function`` (outbox_worker.testing's, or its sync twin's) cannot use ``session``,
    and what to call instead."""
    kind = drivers._name(session)
    if sync and drivers.async_runner_unchecked(session) is not None:
        return (
            f"outbox_worker.testing.sync.{function}() takes a sync session or connection, and "
            f"this is an async {kind}: call `await outbox_worker.testing.{function}(...)`"
        )
    if not sync and drivers.sync_runner_unchecked(session) is not None:
        return (
            f"outbox_worker.testing.{function}() takes an async session or connection, and "
            f"this is a sync {kind}: call outbox_worker.testing.sync.{function}(), which is "
            "not awaited"
        )
    called = f"outbox_worker.testing.{'sync.' if sync else ''}{function}()"
    return (
        f"{called} cannot use {kind}: pass the session or connection whose transaction the "
        "jobs are in: SQLAlchemy's AsyncSession or AsyncConnection, an asyncpg connection or "
        f"a psycopg AsyncConnection to outbox_worker.testing.{function}(); SQLAlchemy's "
        "Session or Connection (psycopg or psycopg2) or a psycopg Connection to "
        f"outbox_worker.testing.sync.{function}()"
    )


# The plans: what assert_enqueued, refute_enqueued and clear_jobs do, the same whatever
# session runs them, here or in outbox_worker.testing.sync. Rows come back as sequences of
# columns, sql.JOB_SELECT_LIST's in JOB_COLUMNS' order.


class _Search(NamedTuple):
    """JOB_FIND's parameters, and the search in words for a failure message."""

    params: dict[str, Any]
    wanted: str


def _search(
    task: str,
    args: Mapping[str, Any] | None,
    *,
    queue: str | None,
    state: JobState | str | None,
    priority: int | None,
    max_attempts: int | None,
    key: str | None,
    correlation_id: str | None,
) -> _Search:
    """The search, built when the helper is called: a state that does not exist raises
    ValueError there, before any SQL."""
    params = {
        "task": task,
        "args": None if args is None else json.dumps(dict(args)),
        "queue": queue,
        "state": None if state is None else JobState(state).value,
        "priority": priority,
        "max_attempts": max_attempts,
        "dedupe_key": key,
        "correlation_id": correlation_id,
    }
    wanted = f"of task {task!r}"
    if args is not None:
        wanted += f" with args containing {_json(args)}"
    for name, value in params.items():
        if name not in ("task", "args") and value is not None:
            wanted += f", {'key' if name == 'dedupe_key' else name}={value!r}"
    return _Search(params, wanted)


def _expect(search: _Search, count: int | None) -> Plan[list[Job]]:
    found = yield from _find(search)
    if (count is None and not found) or (count is not None and len(found) != count):
        expected = "a job" if count is None else f"{count} job{'' if count == 1 else 's'}"
        enqueued = yield from _what_is_enqueued()
        raise AssertionError(f"expected {expected} {search.wanted}, found {len(found)}\n{enqueued}")
    return found


def _refute(search: _Search) -> Plan[None]:
    found = yield from _find(search)
    if found:
        raise AssertionError(
            f"expected no job {search.wanted}, found {len(found)}:\n"
            + "\n".join(_describe(job) for job in found)
        )


def _clear() -> Plan[int]:
    rows = yield sql.JOB_DELETE_ALL, {}
    deleted: int = rows[0][0]
    return deleted


def _find(search: _Search) -> Plan[list[Job]]:
    rows = yield sql.JOB_FIND, search.params
    return [_job(row) for row in rows]


def _what_is_enqueued() -> Plan[str]:
    rows = yield sql.JOB_LIST_NEWEST, {"limit": SHOWN_JOBS + 1}
    if not rows:
        return "outbox_jobs is empty (as this session sees it)"
    more = f", the newest {SHOWN_JOBS} shown" if len(rows) > SHOWN_JOBS else ""
    lines = [_describe(_job(row)) for row in reversed(rows[:SHOWN_JOBS])]
    return f"outbox_jobs holds (as this session sees it{more}):\n" + "\n".join(lines)


def _job(row: Sequence[Any]) -> Job:
    return Job.from_row(dict(zip(JOB_COLUMNS, row, strict=True)))


def _describe(job: Job) -> str:
    details = [
        f"queue={job.queue}",
        f"state={job.state}",
        f"attempts={job.attempts}/{job.max_attempts}",
        f"args={_json(job.args)}",
    ]
    if job.priority:
        details.append(f"priority={job.priority}")
    if job.dedupe_key is not None:
        details.append(f"key={job.dedupe_key!r}")
    if job.correlation_id is not None:
        details.append(f"correlation_id={job.correlation_id!r}")
    return f"  #{job.id} {job.task} " + " ".join(details)


def _json(value: Any) -> str:
    shown = json.dumps(value, sort_keys=True, ensure_ascii=False, default=repr)
    return shown if len(shown) <= 200 else shown[:199] + "…"
