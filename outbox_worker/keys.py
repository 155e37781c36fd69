"""Job keys with a scope, given as ``key=`` to every enqueue function.

A plain ``str`` key allows one job per ``(task, key)`` for as long as the job is kept (until
it is pruned). These say otherwise; each is enforced by a unique index, so concurrent
enqueues from any number of processes are decided by the database:

- :class:`ActiveKey`: one queued or running job per key; once it has finished, the key
  enqueues a new job.
- :class:`Throttle`: one job per key per window of ``per`` (fixed windows of the database's
  clock, from the Unix epoch).
- :class:`Debounce`: while the job waits unclaimed, enqueueing again replaces its args and
  pushes its start to ``period`` from now, never past ``max_wait`` after the first enqueue;
  once a worker has it, the next enqueue writes one follow-up job.

In every case an enqueue that writes nothing returns the existing job with
``duplicate=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True, slots=True)
class ActiveKey:
    """At most one queued or running job of the task with this key."""

    value: str


@dataclass(frozen=True, slots=True)
class Throttle:
    """At most one job of the task with this key per window of ``per`` (seconds or a
    timedelta); the windows are fixed, aligned to the Unix epoch, on the database's clock."""

    value: str
    per: float | timedelta


@dataclass(frozen=True, slots=True)
class Debounce:
    """One waiting job of the task with this key, started ``period`` after the last enqueue
    (its args are the last enqueue's), or ``max_wait`` after the first at the latest."""

    value: str
    period: float | timedelta
    max_wait: float | timedelta | None = None


JobKey = str | ActiveKey | Throttle | Debounce
