"""The test helpers for a sync test suite (plain pytest functions, FastAPI's TestClient, a
sync SQLAlchemy or SQLModel Session): outbox_worker.testing's, called without ``await``.

``assert_enqueued``, ``refute_enqueued`` and ``clear_jobs`` run the very plans of the async
helpers, on a sync session or connection: SQLAlchemy's Session or Connection (SQLModel's
too) on psycopg 3 or psycopg2, or a raw psycopg Connection. The parameters, answers and
failure messages are theirs.

``drain`` and ``perform_job`` run the async ones to their end in an event loop of their own
(``asyncio.run``), so they serve code with no event loop running: where one runs (an async
test), they raise RuntimeError rather than block it, and the async ones are to be awaited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from outbox_worker import drivers, testing
from outbox_worker.client import SyncSessionLike
from outbox_worker.errors import WrongSession
from outbox_worker.jobs import Job, JobState
from outbox_worker.registry import Registry
from outbox_worker.testing._assertions import _clear, _expect, _refusal, _refute, _search
from outbox_worker.testing._drain import DrainResult

T = TypeVar("T")

__all__ = [
    "DrainResult",
    "assert_enqueued",
    "clear_jobs",
    "drain",
    "perform_job",
    "refute_enqueued",
]


def assert_enqueued(
    session: SyncSessionLike,
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
) -> list[Job]:
    """:func:`outbox_worker.testing.assert_enqueued` on a sync session or connection: the
    matching jobs, read in its transaction, or AssertionError."""
    runner = _runner(session, "assert_enqueued")
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
    session: SyncSessionLike,
    task: str,
    args: Mapping[str, Any] | None = None,
    *,
    queue: str | None = None,
    state: JobState | str | None = None,
    priority: int | None = None,
    max_attempts: int | None = None,
    key: str | None = None,
    correlation_id: str | None = None,
) -> None:
    """:func:`outbox_worker.testing.refute_enqueued` on a sync session or connection."""
    runner = _runner(session, "refute_enqueued")
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
    runner(session, _refute(search))


def clear_jobs(session: SyncSessionLike) -> int:
    """:func:`outbox_worker.testing.clear_jobs` on a sync session or connection: every job
    deleted in its transaction, never committed; returns how many."""
    return _runner(session, "clear_jobs")(session, _clear())


def _runner(session: object, function: str) -> drivers.SyncRunner:
    runner = drivers.sync_runner_unchecked(session)
    if runner is None:
        raise WrongSession(_refusal(session, function, sync=True))
    return runner


def drain(
    registry: Registry,
    database: str,
    *,
    queues: Iterable[str] | None = None,
    limit: int | None = None,
) -> DrainResult:
    """:func:`outbox_worker.testing.drain`, run to its end in an event loop of its own.

    ``database`` is the app's database URL: a pool belongs to the event loop it was made in,
    and this loop is new (each handler runs in it too). Like the async drain it sees
    committed jobs only: commit, or let the TestClient's request finish, first."""
    return _run(
        "drain",
        database,
        lambda: testing.drain(registry, database, queues=queues, limit=limit),
    )


def perform_job(
    registry: Registry,
    task: str,
    args: Mapping[str, Any] | None = None,
    *,
    database: str | None = None,
    job_id: int = 0,
    attempt: int = 1,
    correlation_id: str | None = None,
) -> Any:
    """:func:`outbox_worker.testing.perform_job`, run in an event loop of its own: returns
    what the handler returns. ``database`` (for ``ctx.transaction()``) is a URL, for the
    reason :func:`drain` gives."""
    return _run(
        "perform_job",
        database,
        lambda: testing.perform_job(
            registry,
            task,
            args,
            database=database,
            job_id=job_id,
            attempt=attempt,
            correlation_id=correlation_id,
        ),
    )


def _run(function: str, database: object, start: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run`` of the coroutine ``start`` makes, once what cannot run is refused: no
    coroutine is made before that, so none is left never awaited."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # none runs in this thread: asyncio.run can start one
        pass
    else:
        raise RuntimeError(
            f"outbox_worker.testing.sync.{function}() was called while an event loop runs in "
            "this thread, where it cannot run one of its own (and must not block this one): "
            f"await outbox_worker.testing.{function}(...) instead"
        )
    if database is not None and not isinstance(database, str):
        raise TypeError(
            f"outbox_worker.testing.sync.{function}() takes the database's URL, not "
            f"{type(database).__name__}: a pool or connection belongs to the event loop it "
            "was made in, and this one runs in a new loop"
        )
    return asyncio.run(start())
