"""What an app enqueues with: an :class:`Outbox` built at start-up, or the module-level
functions.

An Outbox holds everything the client side needs, given when it is built: the registry
whose tasks it enqueues (and the names an API process declares without their handlers), the
size limit of a job's args, and the queues' depth limits with their cache. Nothing is read
from the environment on a first call, and no other registry of the process is looked in.
``outbox.enqueue`` is awaited with an async session or connection, ``outbox.sync.enqueue``
called with a sync one; both run the same plan (outbox_worker.enqueue_plans) through the same
drivers (outbox_worker.drivers), and refuse the other side's sessions before any SQL.

The module-level ``outbox_worker.enqueue`` and ``outbox_worker.sync.enqueue`` are the methods
of one Outbox that keeps the behaviour they had before Outbox existed: settings read from
``OUTBOX_*`` on first use, and task names looked up in every live registry.
"""

from __future__ import annotations

import math
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, overload

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from outbox_worker import drivers
from outbox_worker.client_plans import (
    ConfiguredPlanner,
    EnvironmentPlanner,
    Planner,
    checked_autocommit,
)
from outbox_worker.config import WorkerSettings
from outbox_worker.enqueue_plans import Backpressure, NewJob
from outbox_worker.errors import ConfigError
from outbox_worker.jobs import Job
from outbox_worker.keys import JobKey
from outbox_worker.names import NAME_PATTERN, is_valid_name
from outbox_worker.registry import DeclaredTask, Registry

if TYPE_CHECKING:
    import psycopg


class AsyncpgConnection(Protocol):
    """What enqueue uses of an asyncpg connection (or a pool's): asyncpg ships no types, so
    this is what lets mypy tell it from a sync session."""

    def is_in_transaction(self) -> bool: ...

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...


# What ``enqueue`` (awaited) and ``sync.enqueue`` take: the session or connection whose
# transaction the job joins.
AsyncSessionLike: TypeAlias = (
    "AsyncSession | AsyncConnection | AsyncpgConnection | psycopg.AsyncConnection[Any]"
)
SyncSessionLike: TypeAlias = "Session | Connection | psycopg.Connection[Any]"

_DEFAULT_MAX_ARGS_BYTES: int = WorkerSettings.model_fields["max_args_bytes"].default
_DEFAULT_CACHE_SECONDS: float = WorkerSettings.model_fields["queue_depth_cache_seconds"].default


class Outbox:
    """The client side of the queue, built once at the app's start-up.

    ``registry``: the tasks it enqueues, checked by name. ``tasks``: names it enqueues
    without their handlers (they live in a worker's codebase), with their options.
    ``max_args_bytes``: the largest args, as compact JSON. ``queue_depth_limits``: queue
    name → most queued jobs; beyond, enqueue raises QueueFull (each queue's depth is counted
    at most once per ``queue_depth_cache_seconds``).

    ``await outbox.enqueue(session, ...)`` takes an async session or connection;
    ``outbox.sync.enqueue(session, ...)`` a sync one, with the same settings.
    """

    def __init__(
        self,
        registry: Registry | None = None,
        *,
        tasks: Iterable[DeclaredTask] = (),
        max_args_bytes: int = _DEFAULT_MAX_ARGS_BYTES,
        queue_depth_limits: Mapping[str, int] | None = None,
        queue_depth_cache_seconds: float = _DEFAULT_CACHE_SECONDS,
    ) -> None:
        if registry is not None and not isinstance(registry, Registry):
            raise ConfigError(
                f"an Outbox's registry is a Registry, not {type(registry).__name__}; "
                "tasks without handlers go in tasks=[DeclaredTask(...)]"
            )
        declared: dict[str, DeclaredTask] = {}
        for task in tasks:
            if not isinstance(task, DeclaredTask):
                raise ConfigError(f"tasks holds DeclaredTask values, not {task!r}")
            if task.name in declared or (registry is not None and task.name in registry):
                raise ConfigError(f"task {task.name!r} is declared twice (or also registered)")
            declared[task.name] = task
        if isinstance(max_args_bytes, bool) or not isinstance(max_args_bytes, int):
            raise ConfigError(f"max_args_bytes must be an integer, not {max_args_bytes!r}")
        if max_args_bytes < 1:
            raise ConfigError(f"max_args_bytes must be positive, not {max_args_bytes}")
        limits = dict(queue_depth_limits or {})
        for queue, limit in limits.items():
            if not is_valid_name(queue):
                raise ConfigError(f"queue name {queue!r} must match {NAME_PATTERN}")
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ConfigError(f"the depth limit of {queue!r} must be a positive integer")
        if not (isinstance(queue_depth_cache_seconds, int | float)) or not (
            0 <= queue_depth_cache_seconds < math.inf
        ):
            raise ConfigError("queue_depth_cache_seconds must be a finite number, 0 or more")
        self._core: Planner = ConfiguredPlanner(
            registry, declared, max_args_bytes, Backpressure(limits, queue_depth_cache_seconds)
        )
        self.sync = SyncOutbox(self._core)

    @classmethod
    def from_env(
        cls, registry: Registry | None = None, *, tasks: Iterable[DeclaredTask] = ()
    ) -> Outbox:
        """An Outbox with the settings of the worker's environment, read now:
        OUTBOX_MAX_ARGS_BYTES, OUTBOX_QUEUE_DEPTH_LIMITS, OUTBOX_QUEUE_DEPTH_CACHE_SECONDS."""
        settings = WorkerSettings()
        return cls(
            registry,
            tasks=tasks,
            max_args_bytes=settings.max_args_bytes,
            queue_depth_limits=settings.queue_depth_limits,
            queue_depth_cache_seconds=settings.queue_depth_cache_seconds,
        )

    @classmethod
    def _of(cls, core: Planner) -> Outbox:
        outbox = cls.__new__(cls)
        outbox._core = core
        outbox.sync = SyncOutbox(core)
        return outbox

    @overload
    def enqueue(
        self,
        session: AsyncSessionLike,
        task: NewJob,
        /,
        *,
        max_args_bytes: int | None = None,
        autocommit: bool = False,
    ) -> Coroutine[Any, Any, Job]: ...

    @overload
    def enqueue(
        self,
        session: AsyncSessionLike,
        task: str,
        args: Mapping[str, Any] | None = None,
        *,
        key: JobKey | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        correlation_id: str | None = None,
        tags: Sequence[str] | None = None,
        concurrency_key: str | None = None,
        max_args_bytes: int | None = None,
        autocommit: bool = False,
    ) -> Coroutine[Any, Any, Job]: ...

    def enqueue(
        self,
        session: AsyncSessionLike,
        task: str | NewJob,
        args: Mapping[str, Any] | None = None,
        *,
        key: JobKey | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        correlation_id: str | None = None,
        tags: Sequence[str] | None = None,
        concurrency_key: str | None = None,
        max_args_bytes: int | None = None,
        autocommit: bool = False,
    ) -> Coroutine[Any, Any, Job]:
        """Add a job in the caller's transaction and return it; never commits. Awaited.

        ``task`` is a task's name with its ``args``, or a NewJob (a task handle's
        ``job(...)``). With ``key``, a second enqueue of the same ``(task, key)`` writes
        nothing and returns the existing job with ``duplicate=True``. Without
        ``correlation_id``, the current request's (or job's) id is used. A refusal
        (EnqueueError, or WrongSession for a sync session) is raised by the call itself,
        before any SQL.

        ``autocommit=True``, on a raw connection outside a transaction only, lets the job
        commit on its own in the statement that writes it: for a script or service with
        nothing else to commit, in one round trip instead of BEGIN, INSERT and COMMIT.
        """
        runner = drivers.async_runner(session, "enqueue", checked_autocommit(autocommit))
        options = (
            key,
            queue,
            priority,
            max_attempts,
            delay,
            run_at,
            correlation_id,
            tags,
            concurrency_key,
        )
        return runner(session, self._core.plan_one(task, args, options, max_args_bytes))

    def enqueue_many(
        self,
        session: AsyncSessionLike,
        jobs: Sequence[NewJob],
        *,
        max_args_bytes: int | None = None,
        autocommit: bool = False,
    ) -> Coroutine[Any, Any, list[Job]]:
        """Add many jobs in one statement, in the caller's transaction; never commits.
        Awaited.

        Returns one Job per input, in input order. Keys dedupe as in :meth:`enqueue`, also
        between jobs of the same call: the first wins and the later ones come back as
        duplicates. One refused job refuses them all, before any SQL.
        """
        runner = drivers.async_runner(session, "enqueue_many", checked_autocommit(autocommit))
        return runner(session, self._core.plan_many(jobs, max_args_bytes))


class SyncOutbox:
    """An Outbox's sync face, ``outbox.sync``: the same settings and depth-limit cache, for
    a sync SQLAlchemy Session or Connection (on psycopg or psycopg2) or a psycopg
    Connection. The calls return the Job itself: nothing to await."""

    def __init__(self, core: Planner) -> None:
        self._core = core

    @overload
    def enqueue(
        self,
        session: SyncSessionLike,
        task: NewJob,
        /,
        *,
        max_args_bytes: int | None = None,
        autocommit: bool = False,
    ) -> Job: ...

    @overload
    def enqueue(
        self,
        session: SyncSessionLike,
        task: str,
        args: Mapping[str, Any] | None = None,
        *,
        key: JobKey | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        correlation_id: str | None = None,
        tags: Sequence[str] | None = None,
        concurrency_key: str | None = None,
        max_args_bytes: int | None = None,
        autocommit: bool = False,
    ) -> Job: ...

    def enqueue(
        self,
        session: SyncSessionLike,
        task: str | NewJob,
        args: Mapping[str, Any] | None = None,
        *,
        key: JobKey | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        correlation_id: str | None = None,
        tags: Sequence[str] | None = None,
        concurrency_key: str | None = None,
        max_args_bytes: int | None = None,
        autocommit: bool = False,
    ) -> Job:
        """:meth:`Outbox.enqueue` for a sync session or connection: the Job, not awaited."""
        runner = drivers.sync_runner(session, "enqueue", checked_autocommit(autocommit))
        options = (
            key,
            queue,
            priority,
            max_attempts,
            delay,
            run_at,
            correlation_id,
            tags,
            concurrency_key,
        )
        return runner(session, self._core.plan_one(task, args, options, max_args_bytes))

    def enqueue_many(
        self,
        session: SyncSessionLike,
        jobs: Sequence[NewJob],
        *,
        max_args_bytes: int | None = None,
        autocommit: bool = False,
    ) -> list[Job]:
        """:meth:`Outbox.enqueue_many` for a sync session or connection: not awaited."""
        runner = drivers.sync_runner(session, "enqueue_many", checked_autocommit(autocommit))
        return runner(session, self._core.plan_many(jobs, max_args_bytes))


_ENVIRONMENT = Outbox._of(EnvironmentPlanner())

# The module-level functions: outbox_worker.enqueue and enqueue_many (awaited), and
# outbox_worker.sync's (not awaited).
enqueue = _ENVIRONMENT.enqueue
enqueue_many = _ENVIRONMENT.enqueue_many
