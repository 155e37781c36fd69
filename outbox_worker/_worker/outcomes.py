"""What became of one attempt, built by constructors, written by the completer."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class StopReason(enum.Enum):
    """Why the worker stopped a handler, which decides what its attempt ends as."""

    CANCEL = "an operator asked to cancel the job"
    SHUTDOWN = "the worker is shutting down"
    LEASE = "the lease could not be extended"


@dataclass(frozen=True, slots=True)
class Succeeded:
    job_id: int
    attempt: int
    result: str | None


@dataclass(frozen=True, slots=True)
class Failed:
    """A failed attempt: queued again after ``delay`` seconds, or dead when out of attempts
    or when ``give_up`` (it could never succeed: unknown task, args that do not fit)."""

    job_id: int
    attempt: int
    error: str
    delay: float
    give_up: bool = False


@dataclass(frozen=True, slots=True)
class Released:
    """Interrupted by shutdown: handed back for an immediate retry (the attempt counts)."""

    job_id: int
    attempt: int


@dataclass(frozen=True, slots=True)
class Unclaimed:
    """Claimed ahead of a free slot and never started: handed back, the attempt taken back."""

    job_id: int
    attempt: int


@dataclass(frozen=True, slots=True)
class Cancelled:
    """Stopped at an operator's request while running, or cancelled by its handler with a
    ``reason`` (CancelJob), which becomes its last_error."""

    job_id: int
    attempt: int
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Snoozed:
    """Back to queued after ``delay`` seconds, the attempt given back (SnoozeJob); dead once
    the row has been snoozed ``max_snoozes`` times."""

    job_id: int
    attempt: int
    delay: float
    max_snoozes: int


@dataclass(frozen=True, slots=True)
class Settled:
    """Nothing left to write: the job completed inside its own transaction, or its lease was
    lost and the row belongs to someone else now."""

    job_id: int
    attempt: int


@dataclass(frozen=True, slots=True)
class Abandoned:
    """Nothing can be written, yet the row may still be running under this worker's name: its
    handler was stopped because the lease could not be extended, or its outcome could not be
    written. The lease lapses and a rescuer takes the job back, counting the attempt."""

    job_id: int
    attempt: int


Outcome = Succeeded | Failed | Released | Unclaimed | Cancelled | Snoozed | Settled | Abandoned
