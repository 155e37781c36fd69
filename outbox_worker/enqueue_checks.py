"""The checks every enqueue makes before any SQL: a call's arguments become the row to insert,
or an error that says what is wrong. Every refusal is raised here, so a refused job leaves the
caller's transaction untouched and usable.

The common case (a registered task, flat args, no options) is checked in one pass; the rest
(nested args, options) is walked with care for what json.dumps would accept silently: keys
that are not strings, nesting readers could not show, args that would expand enormously, NUL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from outbox_worker.config import MAX_DELAY_SECONDS
from outbox_worker.context import current_correlation_id
from outbox_worker.errors import ArgsTooLarge, InvalidArgs, InvalidName, InvalidOption
from outbox_worker.jobs import MAX_JSON_DEPTH
from outbox_worker.keys import ActiveKey, Debounce, JobKey, Throttle
from outbox_worker.names import NAME_PATTERN, is_valid_name

if TYPE_CHECKING:
    from outbox_worker.enqueue_plans import NewJob

INT32_MAX = 2**31 - 1
MAX_KEY_LENGTH = 512
MAX_TAGS = 20
MAX_TAG_LENGTH = 128
MAX_CONCURRENCY_KEY_LENGTH = 200
# A throttled key is stored with its window appended: "@2026-12-07T10:15:00Z".
THROTTLED_KEY_LENGTH = MAX_KEY_LENGTH - len("@2026-12-07T10:15:00Z")
MAX_CORRELATION_ID_LENGTH = 255
# A \u0000 escape in JSON text (a real NUL), not an escaped backslash followed by "u0000".
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Built once: json.dumps builds a new encoder on every call that passes options.
ENCODER = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":"))
_SCALARS = (str, int, float, bool, type(None))
# asyncpg encodes these two instants as -infinity and infinity (outbox_jobs_run_at_readable).
_INFINITIES = (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))


class TaskDefaults(Protocol):
    """What an enqueue takes from its task when the call does not say: a registered task's
    TaskSpec, or a task an API process declared without its handler."""

    @property
    def queue(self) -> str: ...

    @property
    def priority(self) -> int: ...

    @property
    def max_attempts(self) -> int: ...


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


def encode_args(task: str, args: object, limit: int) -> str:
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
        encoded = ENCODER.encode(args)
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


class Row(NamedTuple):
    """One checked job: JOB_INSERT's parameters, by name. Of the keys, one at most is set:
    ``dedupe_key`` (a plain or throttled key: ``throttle`` is its window in seconds, which
    the statement appends to it), ``active_key`` or ``debounce_key`` (``debounce_max``:
    seconds from the first enqueue to the latest start)."""

    queue: str
    task: str
    args: str
    priority: int
    max_attempts: int
    run_at: datetime | None
    delay: float
    dedupe_key: str | None
    correlation_id: str | None
    throttle: float | None = None
    active_key: str | None = None
    debounce_key: str | None = None
    debounce_max: float | None = None
    tags: tuple[str, ...] | None = None
    concurrency_key: str | None = None


def _seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not 0 <= seconds <= MAX_DELAY_SECONDS  # also False for NaN
        or (seconds == 0 and not allow_zero)
    ):
        low = "0 or more" if allow_zero else "over 0"
        raise InvalidOption(f"{name} must be {low} and at most {MAX_DELAY_SECONDS:.0f} seconds")
    return float(seconds)


def _tags(tags: object) -> tuple[str, ...] | None:
    """Labels to find the job by (``GET /jobs?tag=``): a few short texts."""
    if tags is None:
        return None
    if isinstance(tags, str) or not isinstance(tags, Iterable):
        raise InvalidOption("tags must be a list of texts, e.g. tags=['tenant:acme']")
    checked_tags = tuple(tags)
    if len(checked_tags) > MAX_TAGS:
        raise InvalidOption(f"at most {MAX_TAGS} tags, not {len(checked_tags)}")
    for tag in checked_tags:
        if not isinstance(tag, str) or not tag:
            raise InvalidOption(f"a tag is a non-empty text, not {tag!r}")
        _text_option("tag", tag, MAX_TAG_LENGTH)
    return checked_tags


def _concurrency_key(value: object) -> str | None:
    """The key a queue's per-key limit counts by: printable, since operators read it in logs
    and on the dashboard, and short, since claims sort and compare it."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidOption(f"concurrency_key must be a string, not {type(value).__name__}")
    if not value or len(value) > MAX_CONCURRENCY_KEY_LENGTH:
        raise InvalidOption(
            f"concurrency_key must be 1 to {MAX_CONCURRENCY_KEY_LENGTH} characters, "
            f"not {len(value)}"
        )
    if _CONTROL.search(value):
        raise InvalidOption(f"concurrency_key must hold no control characters: {value!r}")
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise InvalidOption(f"concurrency_key is not valid Unicode text: {exc}") from exc
    return value


def _key_fields(key: JobKey | None) -> dict[str, Any]:
    """The Row fields of a key, checked."""
    if key is None or isinstance(key, str):
        return {"dedupe_key": _text_option("key", key, MAX_KEY_LENGTH)}
    if isinstance(key, ActiveKey):
        return {"active_key": _text_option("key", key.value, MAX_KEY_LENGTH)}
    if isinstance(key, Throttle):
        return {
            "dedupe_key": _text_option("key", key.value, THROTTLED_KEY_LENGTH),
            "throttle": _seconds("Throttle's per", key.per),
        }
    if isinstance(key, Debounce):
        period = _seconds("Debounce's period", key.period, allow_zero=True)
        max_wait = None if key.max_wait is None else _seconds("Debounce's max_wait", key.max_wait)
        if max_wait is not None and max_wait < period:
            raise InvalidOption("Debounce's max_wait must be at least its period")
        return {
            "debounce_key": _text_option("key", key.value, MAX_KEY_LENGTH),
            "debounce_max": max_wait,
            "delay": period,
        }
    raise InvalidOption(
        f"key must be text, ActiveKey, Throttle or Debounce, not {type(key).__name__}"
    )


def checked(
    job: NewJob, max_args_bytes: int, spec: TaskDefaults, correlation_id: str | None
) -> Row:
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
        and job.tags is None
        and job.concurrency_key is None
    ):
        # Every option from the task (checked when it was registered): only args to check.
        return Row(
            spec.queue,
            job.task,
            encode_args(job.task, job.args, max_args_bytes),
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
    keys = _key_fields(job.key)
    if "delay" in keys and (job.run_at is not None or job.delay is not None):
        raise InvalidOption("a debounced job starts after its period: give no delay or run_at")
    row = Row(
        queue,
        job.task,
        encode_args(job.task, job.args, max_args_bytes),
        _int_option(
            "priority", spec.priority if job.priority is None else job.priority, -INT32_MAX
        ),
        _int_option(
            "max_attempts", spec.max_attempts if job.max_attempts is None else job.max_attempts, 1
        ),
        job.run_at,
        float(delay),
        None,
        correlation_id
        if job.correlation_id is None
        else _text_option("correlation_id", job.correlation_id, MAX_CORRELATION_ID_LENGTH),
    )
    return row._replace(
        **keys, tags=_tags(job.tags), concurrency_key=_concurrency_key(job.concurrency_key)
    )


def checked_correlation_id() -> str | None:
    return _text_option("correlation_id", current_correlation_id.get(), MAX_CORRELATION_ID_LENGTH)
