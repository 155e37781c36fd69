"""What an enqueue does, the same whatever session or connection runs it.

Two halves, neither of which touches a database: the checks that turn a call's arguments
into the row to insert (outbox_worker.enqueue_checks: every refusal is raised there, before
any SQL), and the statements that write it as a sans-IO plan, here: a generator that yields
each statement with its parameters and is sent back the rows, so the insert, the key dedupe
and the backpressure count exist once for every driver (outbox_worker.drivers runs them).
Nothing here commits: the job exists iff the caller's transaction does.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import operator
import time
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from prometheus_client import Counter

from outbox_worker import metrics, sql, tracing
from outbox_worker.config import WorkerSettings
from outbox_worker.enqueue_checks import Row, TaskDefaults, checked, checked_correlation_id
from outbox_worker.errors import EnqueueError, QueueFull
from outbox_worker.jobs import JOB_COLUMNS, Job, JobState
from outbox_worker.keys import JobKey

T = TypeVar("T")

_QUEUED = JobState.QUEUED


@dataclass(frozen=True, slots=True)
class NewJob:
    """One job to enqueue, as one value: for ``enqueue_many``, and what a task handle's
    ``job()`` builds. The fields mean what :func:`enqueue`'s arguments do."""

    task: str
    args: Mapping[str, Any] = field(default_factory=dict)
    key: JobKey | None = None
    queue: str | None = None
    priority: int | None = None
    max_attempts: int | None = None
    delay: float | timedelta | None = None
    run_at: datetime | None = None
    correlation_id: str | None = None
    tags: Sequence[str] | None = None
    concurrency_key: str | None = None

    def with_options(
        self,
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
    ) -> NewJob:
        """This job with the options given set and the others kept: how a job built by a
        task handle, whose keyword arguments all belong to the handler, gets a key or a
        delay (``send_welcome_email.job(user_id=42).with_options(key="welcome:42")``)."""
        given: dict[str, Any] = {
            "key": key,
            "queue": queue,
            "priority": priority,
            "max_attempts": max_attempts,
            "delay": delay,
            "run_at": run_at,
            "correlation_id": correlation_id,
            "tags": tags,
            "concurrency_key": concurrency_key,
        }
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})


@functools.cache
def _enqueued(task: str, queue: str) -> Counter:
    """The counter's child for (task, queue), looked up once: labels() takes a lock."""
    return metrics.ENQUEUED.labels(task, queue)


@functools.cache
def default_max_args_bytes() -> int:
    """OUTBOX_MAX_ARGS_BYTES, read once, for the module-level enqueue functions only: an
    Outbox is given its limit when it is built."""
    return WorkerSettings().max_args_bytes


@functools.cache
def default_backpressure() -> Backpressure:
    """The depth limits of OUTBOX_QUEUE_DEPTH_LIMITS, read once, for the module-level enqueue
    functions only."""
    settings = WorkerSettings()
    return Backpressure(settings.queue_depth_limits, settings.queue_depth_cache_seconds)


# One step of a plan: an app-side statement of outbox_worker.sql (``:name`` parameters) and its
# parameters by name. The plan is sent back the statement's rows, each a sequence of columns
# in SELECT order, whatever driver ran it.
Query = tuple[str, Mapping[str, Any]]
Rows = Sequence[Sequence[Any]]
Plan = Generator[Query, Rows, T]


class Backpressure:
    """Per-queue depth limits (``{"reports": 10000}``).

    The depth is counted no further than the limit, and the answer is kept for
    ``cache_seconds`` so that a busy API pays for one count a second per queue, not one per
    request. It is backpressure, not a quota: a burst may pass the limit by a second's
    worth of jobs before enqueue starts refusing.
    """

    def __init__(self, limits: Mapping[str, int], cache_seconds: float) -> None:
        self.limits = dict(limits)
        self.cache_seconds = cache_seconds
        self._full_until: dict[str, float] = {}
        self._fine_until: dict[str, float] = {}

    def check(self, queues: Iterable[str]) -> Plan[None]:
        """Count the queues whose last answer is out of date; raise QueueFull for a full one."""
        now = time.monotonic()
        for queue in sorted(queues):
            limit = self.limits.get(queue)
            if limit is None or self._fine_until.get(queue, 0.0) > now:
                continue
            if self._full_until.get(queue, 0.0) <= now:
                [(depth,)] = yield sql.QUEUE_DEPTH_UPTO, {"queue": queue, "limit": limit}
                cache = now + self.cache_seconds
                if depth < limit:
                    self._fine_until[queue] = cache
                    continue
                self._full_until[queue] = cache
            raise QueueFull(
                f"queue {queue!r} holds {limit} or more queued jobs (its depth limit); "
                "the workers are behind",
                retry_after=max(1, math.ceil(self.cache_seconds)),
            )


def _written(
    row: Row, args: Mapping[str, Any], inserted: Sequence[Any], trace_context: str | None
) -> Job:
    """The Job just inserted: what was sent, plus what the database decided
    (sql.client._INSERTED: id, run_at, created_at, the key as stored). Positional, in Job's
    field order: it runs once per job."""
    job_id, run_at, created_at, dedupe_key = inserted
    return Job(
        job_id,
        row.queue,
        row.task,
        dict(args),
        _QUEUED,
        row.priority,
        0,  # attempts
        row.max_attempts,
        run_at,
        dedupe_key,
        row.correlation_id,
        None,  # last_error
        None,  # result
        None,  # locked_by
        None,  # locked_until
        created_at,
        None,  # started_at
        None,  # finished_at
        None,  # cancel_requested_at
        row.active_key,
        row.debounce_key,
        None,  # progress
        row.tags or (),
        row.concurrency_key,
        None if trace_context is None else json.loads(trace_context),
    )


def _find_keyed(rows: Sequence[Row]) -> Plan[list[Job | None]]:
    """The jobs that hold the keys of ``rows`` (each keyed, its insert refused), in their
    order: a debounced one pushed back with the row's args; None where none does any more."""
    answer = yield (
        sql.JOB_FIND_KEYED,
        {
            "tasks": [row.task for row in rows],
            "dedupe_keys": [row.dedupe_key for row in rows],
            "throttles": [row.throttle for row in rows],
            "active_keys": [row.active_key for row in rows],
            "debounce_keys": [row.debounce_key for row in rows],
            "args": [row.args for row in rows],
            "delays": [row.delay for row in rows],
        },
    )
    found: list[Job | None] = [None] * len(rows)
    for place, *columns in answer:
        found[place - 1] = Job.from_row(
            dict(zip(JOB_COLUMNS, columns, strict=True)), duplicate=True
        )
    return found


def plan_one(
    job: NewJob, spec: TaskDefaults, max_args_bytes: int, backpressure: Backpressure
) -> Plan[Job]:
    """Check ``job`` now, raising before any SQL, and return the plan that writes it.

    With a key, a second enqueue of the same ``(task, key)`` writes nothing and returns the
    existing job with ``duplicate=True``. Called in a span, it is traced
    (outbox_worker.tracing): the span current now is the enqueue's parent."""
    row = checked(job, max_args_bytes, spec, checked_correlation_id())
    parent = tracing.enqueue_context()
    if parent is None:
        return _insert_one(row, job.args, backpressure, None)
    return tracing.sending(
        parent, (row,), functools.partial(_insert_one, row, job.args, backpressure)
    )


def _insert_one(
    row: Row, args: Mapping[str, Any], backpressure: Backpressure, trace_context: str | None
) -> Plan[Job]:
    if backpressure.limits:
        yield from backpressure.check((row.queue,))
    params = row._asdict()
    params["tags"] = _tags_json(row.tags)
    params["trace_context"] = trace_context
    # A conflict makes the insert return nothing; the job that holds the key is then read
    # back (a debounced one pushed back). If it no longer holds it by then (pruned, finished,
    # claimed), inserting again is the right answer.
    for _ in range(3):
        inserted = yield sql.JOB_INSERT, params
        if inserted:
            _enqueued(row.task, row.queue).inc()
            return _written(row, args, inserted[0], trace_context)
        [existing] = yield from _find_keyed([row])
        if existing is not None:
            return existing
    raise EnqueueError(
        f"the key of this {row.task!r} job kept conflicting with a job that then let it go"
    )


def plan_many(
    jobs: Sequence[NewJob],
    specs: Mapping[str, TaskDefaults],
    max_args_bytes: int,
    backpressure: Backpressure,
) -> Plan[list[Job]]:
    """Check every job now, raising before any SQL, and return the plan that writes them all
    in one statement; ``specs`` holds the task of each job.

    One Job per input, in input order. Keys dedupe as in :func:`plan_one`, also between jobs
    of the same call: the first wins and the later ones come back as duplicates."""
    correlation_id = checked_correlation_id()
    rows = [checked(job, max_args_bytes, specs[job.task], correlation_id) for job in jobs]
    parent = tracing.enqueue_context() if rows else None
    if parent is None:
        return _insert_many(rows, jobs, backpressure, None)
    return tracing.sending(parent, rows, functools.partial(_insert_many, rows, jobs, backpressure))


# Every column of a Row but args.
_ALL_BUT_ARGS = operator.itemgetter(0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14)
# JOB_INSERT_MANY's arrays, in Row's order.
_ARRAYS = (
    "queues",
    "tasks",
    "args",
    "priorities",
    "max_attempts",
    "run_ats",
    "delays",
    "dedupe_keys",
    "correlation_ids",
    "throttles",
    "active_keys",
    "debounce_keys",
    "debounce_maxes",
    "tags",
    "concurrency_keys",
)


def _tags_json(tags: tuple[str, ...] | None) -> str | None:
    return None if tags is None else json.dumps(tags)


def _keyed(row: Row) -> bool:
    return row.dedupe_key is not None or row.active_key is not None or row.debounce_key is not None


def _insert_many(
    rows: list[Row],
    jobs: Sequence[NewJob],
    backpressure: Backpressure,
    trace_context: str | None,
) -> Plan[list[Job]]:
    if not rows:
        return []
    if backpressure.limits:
        yield from backpressure.check({row.queue for row in rows})
    first = rows[0]
    common = _ALL_BUT_ARGS(first)
    answer: Rows
    if not _keyed(first) and all(_ALL_BUT_ARGS(row) == common for row in rows):
        # Unkeyed jobs alike but for their args: JOB_INSERT_MANY_UNIFORM.
        params = {
            "queue": first.queue,
            "task": first.task,
            "args": [row.args for row in rows],
            "priority": first.priority,
            "max_attempts": first.max_attempts,
            "run_at": first.run_at,
            "delay": first.delay,
            "correlation_id": first.correlation_id,
            "tags": _tags_json(first.tags),
            "concurrency_key": first.concurrency_key,
            "trace_context": trace_context,
        }
        [(ids, run_at, created_at)] = yield sql.JOB_INSERT_MANY_UNIFORM, params
        answer = [(job_id, run_at, created_at, None) for job_id in ids]
    else:
        # zip(*rows) transposes the rows into columns without a dict per job; a key that
        # is taken comes back as NULLs.
        columns = dict(zip(_ARRAYS, map(list, zip(*rows, strict=True)), strict=True))
        # An array of arrays cannot be unnested row by row: each row's tags go as JSON.
        columns["tags"] = [_tags_json(tags) for tags in columns["tags"]]
        answer = yield sql.JOB_INSERT_MANY, {**columns, "trace_context": trace_context}
    result: list[Job | None] = [
        None if inserted[0] is None else _written(row, job.args, inserted, trace_context)
        for inserted, row, job in zip(answer, rows, jobs, strict=True)
    ]
    written = collections.Counter((job.task, job.queue) for job in result if job is not None)
    for (task, queue), count in written.items():
        _enqueued(task, queue).inc(count)
    missing = [i for i, job in enumerate(result) if job is None]
    if missing:
        found = yield from _find_keyed([rows[i] for i in missing])
        for i, existing in zip(missing, found, strict=True):
            if existing is None:
                raise EnqueueError(
                    f"the key of a {rows[i].task!r} job conflicted with a job that let it go "
                    "meanwhile; nothing was lost, retry the transaction"
                )
            result[i] = existing
    return [job for job in result if job is not None]
