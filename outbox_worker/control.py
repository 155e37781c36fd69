"""What a handler raises to decide how its attempt ends, other than by returning or failing.

They are exceptions so that they end the handler wherever it is, as Celery's ``Retry`` does;
each is written by the worker as one fenced statement, like every outcome: a worker that
lost its lease meanwhile changes nothing.

- :class:`SnoozeJob`: not now. Back to queued after a delay, the attempt given back.
- :class:`CancelJob`: never. The job ends ``cancelled`` with the reason, no retry.
- :class:`RetryJob`: again later, at a time the handler chooses. The attempt counts.
"""

from __future__ import annotations

import math

from outbox_worker.errors import OutboxError

# A year: a delay past it is a bug in the handler more likely than a plan.
MAX_DELAY_SECONDS = 366 * 24 * 3600.0


def _delay(seconds: float, what: str) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"{what} takes seconds as a number, not {type(seconds).__name__}")
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_DELAY_SECONDS:
        raise ValueError(f"{what} takes 0 to {MAX_DELAY_SECONDS:g} seconds, not {seconds!r}")
    return float(seconds)


class JobControl(OutboxError):
    """Raised by a handler to end its attempt in a way of its own choosing."""


class SnoozeJob(JobControl):
    """Run the job again in ``seconds``, without spending an attempt: the resource it waits
    for is not ready (a rate limit, a file not there yet). The row's ``snoozes`` counts them;
    past the task's ``max_snoozes`` the job goes dead instead, so that a job cannot snooze for
    ever."""

    def __init__(self, seconds: float) -> None:
        self.seconds = _delay(seconds, "SnoozeJob")
        super().__init__(f"snoozed for {self.seconds:g}s")


class CancelJob(JobControl):
    """End the job ``cancelled``, with ``reason`` as its ``last_error``; it is not retried."""

    def __init__(self, reason: str) -> None:
        if not isinstance(reason, str):
            raise TypeError(f"CancelJob takes a reason as text, not {type(reason).__name__}")
        self.reason = reason
        super().__init__(reason)


class RetryJob(JobControl):
    """Fail this attempt and run the job again in ``seconds`` (instead of the task's backoff),
    with ``reason`` as its ``last_error``. The attempt counts: on the last one the job goes
    dead, as any failure would."""

    def __init__(self, seconds: float, reason: str = "retry requested by the handler") -> None:
        self.seconds = _delay(seconds, "RetryJob")
        self.reason = reason
        super().__init__(reason)
