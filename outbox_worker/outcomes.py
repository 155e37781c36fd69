"""What became of one attempt, built by constructors, written by the completer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """The columns of a claimed row that running it needs."""

    id: int
    task: str
    queue: str
    args: str
    attempt: int
    max_attempts: int
    correlation_id: str | None


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
    """Interrupted by shutdown: handed back for an immediate retry, the attempt not counted."""

    job_id: int
    attempt: int


@dataclass(frozen=True, slots=True)
class Cancelled:
    """Stopped at an operator's request while running."""

    job_id: int
    attempt: int


@dataclass(frozen=True, slots=True)
class Settled:
    """Nothing left to write: the job completed inside its own transaction, or its lease was
    lost and the row belongs to someone else now."""

    job_id: int
    attempt: int


Outcome = Succeeded | Failed | Released | Cancelled | Settled
