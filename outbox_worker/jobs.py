"""The job row as the library hands it out."""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections.abc import Mapping
from datetime import datetime
from itertools import accumulate
from typing import Any

from pydantic import BaseModel

# How deep args may nest, the object itself being the first level: enqueue refuses deeper.
# Python's JSON readers recurse (json, pydantic, the CLI's and the dashboard's encoders) and
# give out between 300 and 1000 levels, while jsonb holds thousands; so readers cut anything
# deeper (a handler's result, a row written by plain SQL) and show TOO_DEEP in its place.
MAX_JSON_DEPTH = 100
MAX_JOB_ID = 2**63 - 1  # ids are a bigserial
TOO_DEEP = f"(nested deeper than {MAX_JSON_DEPTH} levels: not shown)"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """An end: nothing will run the job again unless an operator retries it."""
        return self in (JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED)


JOB_COLUMNS: tuple[str, ...] = (
    "id",
    "queue",
    "task",
    "args",
    "state",
    "priority",
    "attempts",
    "max_attempts",
    "run_at",
    "dedupe_key",
    "correlation_id",
    "last_error",
    "result",
    "locked_by",
    "locked_until",
    "created_at",
    "started_at",
    "finished_at",
    "cancel_requested_at",
    "active_key",
    "debounce_key",
    "progress",
    "tags",
    "concurrency_key",
    "trace_context",
)


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    """One row of ``outbox_jobs``; ``duplicate`` says enqueue found it rather than wrote it."""

    id: int
    queue: str
    task: str
    args: dict[str, Any]
    state: JobState
    priority: int
    attempts: int
    max_attempts: int
    run_at: datetime
    dedupe_key: str | None
    correlation_id: str | None
    last_error: str | None
    result: Any
    locked_by: str | None
    locked_until: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested_at: datetime | None = None
    active_key: str | None = None
    debounce_key: str | None = None
    progress: Any = None
    tags: tuple[str, ...] = ()
    concurrency_key: str | None = None
    # The W3C trace context of the enqueuer (``traceparent``, ``tracestate``), when
    # OpenTelemetry was on: what the run's span links to, and where to look for the request.
    trace_context: dict[str, Any] | None = None
    duplicate: bool = False

    @classmethod
    def from_row(cls, row: Mapping[Any, Any], *, duplicate: bool = False) -> Job:
        values = {name: row[name] for name in JOB_COLUMNS}
        values["state"] = JobState(values["state"])
        # sql.JOB_SELECT_LIST hands JSON columns over as text so every driver path agrees.
        values["args"] = _read_json(values["args"])
        values["result"] = None if values["result"] is None else _read_json(values["result"])
        values["progress"] = None if values["progress"] is None else _read_json(values["progress"])
        values["tags"] = tuple(values["tags"] or ())
        if values["trace_context"] is not None:
            values["trace_context"] = _read_json(values["trace_context"])
        return cls(**values, duplicate=duplicate)

    @property
    def trace_id(self) -> str | None:
        """The enqueuer's trace id (32 hex digits, from its ``traceparent``): what a tracing
        backend finds the request that enqueued the job by."""
        parent = (self.trace_context or {}).get("traceparent")
        parts = parent.split("-") if isinstance(parent, str) else []
        return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None

    def to_json(self) -> dict[str, Any]:
        """The job as the admin API answers it (``GET /jobs/{id}``), which the CLI's
        ``--json`` prints too, so a script may read either: every column, ``state`` as its
        name, times in ISO 8601 with ``Z``. One model, :class:`JobOut`, makes both."""
        return JobOut.of(self).model_dump(mode="json")


class JobOut(BaseModel):
    """A job in JSON: the admin API's response model, and the form of :meth:`Job.to_json`."""

    id: int
    queue: str
    task: str
    args: dict[str, Any]
    state: JobState
    priority: int
    attempts: int
    max_attempts: int
    run_at: datetime
    dedupe_key: str | None
    correlation_id: str | None
    last_error: str | None
    result: Any
    locked_by: str | None
    locked_until: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested_at: datetime | None
    active_key: str | None
    debounce_key: str | None
    progress: Any
    tags: list[str]
    concurrency_key: str | None
    trace_context: dict[str, Any] | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(**{name: getattr(job, name) for name in JOB_COLUMNS})


# Only brackets outside strings change the depth (not numbers, literals, commas, colons).
_JSON_STRING = r'"[^"\\]*(?:\\.[^"\\]*)*"'
_STRINGS = re.compile(_JSON_STRING)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_JSON_TOKEN = re.compile(rf"{_JSON_STRING}|[\[\]{{}}]")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_TOO_DEEP_JSON = json.dumps(TOO_DEEP)


def _depth(text: str) -> int:
    """How deep ``text`` (valid JSON) nests, found by C loops alone: large shallow args pay
    little for the check."""
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", text))
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def _cut_too_deep(text: str) -> str:
    """``text`` (valid JSON, as jsonb prints it) with every array and object deeper than
    MAX_JSON_DEPTH replaced by TOO_DEEP. A scan, not a recursion: no depth overflows it."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH or _depth(text) <= MAX_JSON_DEPTH:
        return text  # the common case, small args, costs two counts
    kept: list[str] = []
    copied_to = 0
    depth = 0
    for token in _JSON_TOKEN.finditer(text):
        bracket = text[token.start()]
        if bracket == '"':
            continue
        if bracket in "[{":
            depth += 1
            if depth == MAX_JSON_DEPTH + 1:
                kept += (text[copied_to : token.start()], _TOO_DEEP_JSON)
        else:
            if depth == MAX_JSON_DEPTH + 1:
                copied_to = token.end()
            depth -= 1
    kept.append(text[copied_to:])
    return "".join(kept)


def _integer(digits: str) -> int | str:
    try:
        return int(digits)
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
        return f"(integer of {len(digits.lstrip('-'))} digits: not shown)"


def _read_json(text: str) -> Any:
    """A JSON column as every reader can show it: what Python's JSON cannot hold (too deep,
    an integer too long) becomes a marker rather than an error."""
    text = _cut_too_deep(text)
    try:
        return json.loads(text)
    except ValueError:  # jsonb's text is valid JSON: only an integer can fail; mark those
        return json.loads(text, parse_int=_integer)
