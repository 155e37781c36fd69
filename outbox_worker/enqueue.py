"""What an enqueue does, the same whatever session or connection runs it.

Two halves, neither of which touches a database: the checks that turn a call's arguments
into the row to insert (every refusal is raised here, so a refused job leaves the caller's
transaction untouched and usable), and the statements that write it as a sans-IO plan: a
generator that yields each statement with its parameters and is sent back the rows, so the
insert, the key dedupe and the backpressure count exist once for every driver
(outbox_worker.drivers runs them). Nothing here commits: the job exists iff the caller's
transaction does.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import operator
import re
import time
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Protocol, TypeVar

from prometheus_client import Counter

from outbox_worker import metrics, sql
from outbox_worker.config import MAX_DELAY_SECONDS, WorkerSettings
from outbox_worker.context import current_correlation_id
from outbox_worker.errors import (
    ArgsTooLarge,
    EnqueueError,
    InvalidArgs,
    InvalidName,
    InvalidOption,
    QueueFull,
)
from outbox_worker.jobs import JOB_COLUMNS, MAX_JSON_DEPTH, Job, JobState
from outbox_worker.names import NAME_PATTERN, is_valid_name

T = TypeVar("T")


INT32_MAX = 2**31 - 1
MAX_KEY_LENGTH = 512
MAX_CORRELATION_ID_LENGTH = 255
# A \u0000 escape in JSON text (a real NUL), not an escaped backslash followed by "u0000".
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# Built once: json.dumps builds a new encoder on every call that passes options.
_ENCODER = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":"))
_SCALARS = (str, int, float, bool, type(None))
_QUEUED = JobState.QUEUED
# asyncpg encodes these two instants as -infinity and infinity (outbox_jobs_run_at_readable).
_INFINITIES = (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))


@dataclass(frozen=True, slots=True)
class NewJob:
    """One job to enqueue, as one value: for ``enqueue_many``, and what a task handle's
    ``job()`` builds. The fields mean what :func:`enqueue`'s arguments do."""

    task: str
    args: Mapping[str, Any] = field(default_factory=dict)
    key: str | None = None
    queue: str | None = None
    priority: int | None = None
    max_attempts: int | None = None
    delay: float | timedelta | None = None
    run_at: datetime | None = None
    correlation_id: str | None = None

    def with_options(
        self,
        *,
        key: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        correlation_id: str | None = None,
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
        }
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})


class TaskDefaults(Protocol):
    """What an enqueue takes from its task when the call does not say: a registered task's
    TaskSpec, or a task an API process declared without its handler."""

    @property
    def queue(self) -> str: ...

    @property
    def priority(self) -> int: ...

    @property
    def max_attempts(self) -> int: ...


@functools.cache
def _enqueued(task: str, queue: str) -> Counter:
    """The counter's child for (task, queue), looked up once: labels() takes a lock."""
    return metrics.ENQUEUED.labels(task, queue)


@functools.cache
def _default_max_args_bytes() -> int:
    """OUTBOX_MAX_ARGS_BYTES, read once, for the module-level enqueue functions only: an
    Outbox is given its limit when it is built."""
    return WorkerSettings().max_args_bytes


@functools.cache
def _backpressure() -> Backpressure:
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


def _text_option(name: str, value: str | None, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > limit or "\x00" in value:
        raise InvalidOption(f"{name} must be a string of 1 to {limit} characters without NUL")
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise InvalidOption(f"{name} is not valid Unicode text: {exc}") from exc
    return value


_NOT_AN_OBJECT = "must be a JSON object (dicts with str keys)"


def _shape_problem(args: dict[Any, Any]) -> str | None:
    """What json.dumps lets through but must be refused: a nested non-string key (json.dumps
    turns it into a string, and merges colliding ones, without a word), or nesting deeper than
    MAX_JSON_DEPTH, which readers could not show. Iterative, so depth cannot overflow the
    stack."""
    stack: list[tuple[dict[Any, Any] | list[Any] | tuple[Any, ...], int]] = [(args, 1)]
    # The deepest level each container was walked at: a shared one is walked again only
    # deeper, and a circular one ends past the limit instead of hanging.
    walked: dict[int, int] = {}
    while stack:
        item, level = stack.pop()
        if level > MAX_JSON_DEPTH:
            return f"nest deeper than {MAX_JSON_DEPTH} levels (or contain themselves)"
        if walked.get(id(item), 0) >= level:
            continue
        walked[id(item)] = level
        if isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                return _NOT_AN_OBJECT
            children: Iterable[Any] = item.values()
        else:
            children = item
        stack.extend(
            (child, level + 1) for child in children if isinstance(child, dict | list | tuple)
        )
    return None


def _least_size(value: Any, sizes: dict[int, int]) -> int:
    """Fewer bytes than ``value`` takes as JSON, each shared container counted once in
    ``sizes``: args that repeat one list inside itself fifty times over would expand to
    2**50 elements in json.dumps, so they are measured before they are encoded. Called once
    _shape_problem has passed them (no cycle, bounded depth)."""
    if isinstance(value, dict):
        # {"key":value,...}: a brace, each key's quotes and colon, a comma or brace after each.
        items: Iterable[Any] = value.values()
        size = 1 + sum(len(key) + 3 for key in value)
    elif isinstance(value, list | tuple):
        items, size = value, 1
    else:
        return 1
    known = sizes.get(id(value))
    if known is None:
        known = sizes[id(value)] = size + sum(_least_size(item, sizes) + 1 for item in items)
    return known


def _int_option(name: str, value: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= INT32_MAX:
        raise InvalidOption(f"{name} must be an integer from {low} to {INT32_MAX}, got {value!r}")
    return value


def _flat_with_str_keys(args: Mapping[Any, Any]) -> bool:
    """The common case, checked in one pass: string keys and scalar values only."""
    return all(type(k) is str and type(v) in _SCALARS for k, v in args.items())


def _encode_args(task: str, args: object, limit: int) -> str:
    if not (type(args) is dict or isinstance(args, Mapping)):
        raise InvalidArgs(f"args of {task!r} {_NOT_AN_OBJECT}")
    if not _flat_with_str_keys(args):
        problem = _shape_problem(dict(args))
        if problem is not None:
            raise InvalidArgs(f"args of {task!r} {problem}")
        least = _least_size(dict(args), {})
        if least > limit:
            raise ArgsTooLarge(
                f"args of {task!r} are more than {least} bytes as JSON; the limit is {limit}"
            )
    try:
        encoded = _ENCODER.encode(args)
        size = len(encoded) if encoded.isascii() else len(encoded.encode())
    except UnicodeEncodeError as exc:
        raise InvalidArgs(f"args of {task!r} hold text that is not valid Unicode: {exc}") from exc
    except RecursionError as exc:
        raise InvalidArgs(f"args of {task!r} are nested too deeply") from exc
    except (TypeError, ValueError) as exc:
        raise InvalidArgs(f"args of {task!r} are not JSON: {exc}") from exc
    if "\\u0000" in encoded and _NUL_ESCAPE.search(encoded):
        raise InvalidArgs(f"args of {task!r} contain a NUL character, which jsonb cannot store")
    if size > limit:
        raise ArgsTooLarge(f"args of {task!r} are {size} bytes as JSON; the limit is {limit}")
    return encoded


class _Row(NamedTuple):
    """One checked job: JOB_INSERT's parameters, by name."""

    queue: str
    task: str
    args: str
    priority: int
    max_attempts: int
    run_at: datetime | None
    delay: float
    dedupe_key: str | None
    correlation_id: str | None


def _checked(
    job: NewJob, max_args_bytes: int, spec: TaskDefaults, correlation_id: str | None
) -> _Row:
    """Check one job and turn it into JOB_INSERT's parameters; raise before any SQL runs.

    ``correlation_id``: the current one (checked), for a job that names none."""
    if (
        job.queue is None
        and job.priority is None
        and job.max_attempts is None
        and job.delay is None
        and job.run_at is None
        and job.key is None
        and job.correlation_id is None
    ):
        # Every option from the task (checked when it was registered): only args to check.
        return _Row(
            spec.queue,
            job.task,
            _encode_args(job.task, job.args, max_args_bytes),
            spec.priority,
            spec.max_attempts,
            None,
            0.0,
            None,
            correlation_id,
        )
    queue = spec.queue if job.queue is None else job.queue
    if queue is not spec.queue and not is_valid_name(queue):
        raise InvalidName(f"queue name {queue!r} must match {NAME_PATTERN}")
    if job.run_at is not None and job.delay is not None:
        raise InvalidOption("give delay or run_at, not both")
    if job.run_at is not None:
        if not isinstance(job.run_at, datetime) or job.run_at.utcoffset() is None:
            raise InvalidOption("run_at must be a timezone-aware datetime")
        try:
            utc = job.run_at.astimezone(UTC)
        except OverflowError as exc:
            raise InvalidOption("run_at is out of range once converted to UTC") from exc
        if utc in _INFINITIES:
            raise InvalidOption(
                "run_at must lie after datetime.min and before datetime.max (in UTC): "
                "those two are sent as -infinity and infinity, which the table refuses"
            )
    delay = job.delay.total_seconds() if isinstance(job.delay, timedelta) else job.delay
    if delay is None:
        delay = 0.0
    if (
        isinstance(delay, bool)
        or not isinstance(delay, int | float)
        or not 0 <= delay <= MAX_DELAY_SECONDS  # also False for NaN; exact for huge ints
    ):
        raise InvalidOption(f"delay must be from 0 to {MAX_DELAY_SECONDS:.0f} seconds")
    return _Row(
        queue,
        job.task,
        _encode_args(job.task, job.args, max_args_bytes),
        _int_option(
            "priority", spec.priority if job.priority is None else job.priority, -INT32_MAX
        ),
        _int_option(
            "max_attempts", spec.max_attempts if job.max_attempts is None else job.max_attempts, 1
        ),
        job.run_at,
        float(delay),
        _text_option("key", job.key, MAX_KEY_LENGTH),
        correlation_id
        if job.correlation_id is None
        else _text_option("correlation_id", job.correlation_id, MAX_CORRELATION_ID_LENGTH),
    )


def _current_correlation_id() -> str | None:
    return _text_option("correlation_id", current_correlation_id.get(), MAX_CORRELATION_ID_LENGTH)


def _written(row: _Row, args: Mapping[str, Any], inserted: Sequence[Any]) -> Job:
    """The Job just inserted: what was sent, plus what the database decided
    (sql.client._INSERTED: id, run_at, created_at). Positional, in Job's field order: it runs
    once per job."""
    job_id, run_at, created_at = inserted
    queue, task, _, priority, max_attempts, _, _, dedupe_key, correlation_id = row
    return Job(
        job_id,
        queue,
        task,
        dict(args),
        _QUEUED,
        priority,
        0,  # attempts
        max_attempts,
        run_at,
        dedupe_key,
        correlation_id,
        None,  # last_error
        None,  # result
        None,  # locked_by
        None,  # locked_until
        created_at,
        None,  # started_at
        None,  # finished_at
    )


# Where JOB_GET_BY_KEYS' rows (sql.JOB_SELECT_LIST, in JOB_COLUMNS' order) hold their key.
_TASK_AT = JOB_COLUMNS.index("task")
_KEY_AT = JOB_COLUMNS.index("dedupe_key")


def _found(row: Sequence[Any]) -> Job:
    """The job a key already names, read back by JOB_GET_BY_KEY(S)."""
    return Job.from_row(dict(zip(JOB_COLUMNS, row, strict=True)), duplicate=True)


def plan_one(
    job: NewJob, spec: TaskDefaults, max_args_bytes: int, backpressure: Backpressure
) -> Plan[Job]:
    """Check ``job`` now, raising before any SQL, and return the plan that writes it.

    With a key, a second enqueue of the same ``(task, key)`` writes nothing and returns the
    existing job with ``duplicate=True``."""
    return _insert_one(
        _checked(job, max_args_bytes, spec, _current_correlation_id()), job.args, backpressure
    )


def _insert_one(row: _Row, args: Mapping[str, Any], backpressure: Backpressure) -> Plan[Job]:
    if backpressure.limits:
        yield from backpressure.check((row.queue,))
    params = row._asdict()
    # A conflict makes the insert return nothing; the row it met is then read back. If that
    # row is gone by then (pruned in between), inserting again is the right answer.
    for _ in range(3):
        inserted = yield sql.JOB_INSERT, params
        if inserted:
            _enqueued(row.task, row.queue).inc()
            return _written(row, args, inserted[0])
        existing = yield sql.JOB_GET_BY_KEY, {"task": row.task, "dedupe_key": row.dedupe_key}
        if existing:
            return _found(existing[0])
    raise EnqueueError(
        f"job key {row.dedupe_key!r} of {row.task!r} kept conflicting with a vanishing job"
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
    correlation_id = _current_correlation_id()
    rows = [_checked(job, max_args_bytes, specs[job.task], correlation_id) for job in jobs]
    return _insert_many(rows, jobs, backpressure)


# Every column of a _Row but args.
_ALL_BUT_ARGS = operator.itemgetter(0, 1, 3, 4, 5, 6, 7, 8)
# JOB_INSERT_MANY's arrays, in _Row's order.
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
)


def _insert_many(
    rows: list[_Row], jobs: Sequence[NewJob], backpressure: Backpressure
) -> Plan[list[Job]]:
    if not rows:
        return []
    if backpressure.limits:
        yield from backpressure.check({row.queue for row in rows})
    first = rows[0]
    common = _ALL_BUT_ARGS(first)
    answer: Rows
    if first.dedupe_key is None and all(_ALL_BUT_ARGS(row) == common for row in rows):
        # Unkeyed jobs alike but for their args: JOB_INSERT_MANY_UNIFORM.
        params = first._asdict()
        del params["dedupe_key"]
        params["args"] = [row.args for row in rows]
        [(ids, run_at, created_at)] = yield sql.JOB_INSERT_MANY_UNIFORM, params
        answer = [(job_id, run_at, created_at) for job_id in ids]
    else:
        # zip(*rows) transposes the rows into columns without a dict per job; a key that
        # exists comes back as NULLs.
        columns = map(list, zip(*rows, strict=True))
        answer = yield sql.JOB_INSERT_MANY, dict(zip(_ARRAYS, columns, strict=True))
    result: list[Job | None] = [
        None if inserted[0] is None else _written(row, job.args, inserted)
        for inserted, row, job in zip(answer, rows, jobs, strict=True)
    ]
    written = collections.Counter((job.task, job.queue) for job in result if job is not None)
    for (task, queue), count in written.items():
        _enqueued(task, queue).inc(count)
    missing = [i for i, job in enumerate(result) if job is None]
    if missing:
        found = yield (
            sql.JOB_GET_BY_KEYS,
            {
                "tasks": [rows[i].task for i in missing],
                "dedupe_keys": [rows[i].dedupe_key for i in missing],
            },
        )
        by_key = {(row[_TASK_AT], row[_KEY_AT]): row for row in found}
        for i in missing:
            existing = by_key.get((rows[i].task, rows[i].dedupe_key))
            if existing is None:
                raise EnqueueError(
                    f"job key {rows[i].dedupe_key!r} of {rows[i].task!r} conflicted with "
                    "a job that is gone; nothing was lost, retry the transaction"
                )
            result[i] = _found(existing)
    return [job for job in result if job is not None]
