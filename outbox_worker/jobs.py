"""The job row as the library hands it out."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"


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
    duplicate: bool = False

    @classmethod
    def from_row(
        cls,
        row: Mapping[Any, Any],
        *,
        duplicate: bool = False,
        args: dict[str, Any] | None = None,
    ) -> Job:
        """``args``: the args the caller just wrote, to skip decoding them again."""
        values = {name: row[name] for name in JOB_COLUMNS}
        values["state"] = JobState(values["state"])
        # sql.JOB_SELECT_LIST hands JSON columns over as text so every driver path agrees.
        values["args"] = json.loads(values["args"]) if args is None else args
        values["result"] = None if values["result"] is None else json.loads(values["result"])
        return cls(**values, duplicate=duplicate)
