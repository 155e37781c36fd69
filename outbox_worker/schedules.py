"""Periodic jobs: a schedule's definition and the arithmetic of its ticks.

A schedule is declared in code beside its task (:meth:`Registry.schedule`, or
``@registry.periodic`` on a task). Every worker that has it in its registry fires it, and the
database decides which worker enqueues each tick: the schedule's row in ``outbox_schedules``
is locked with ``SKIP LOCKED`` and its ``last_tick`` moves past the ticks enqueued in the
same transaction as their jobs, whose unique key (``<schedule>@<tick>``) could not be
written twice anyway. So each tick is enqueued once across any number of workers and hosts,
with no leader to elect or lose.

This module is pure (no database, no clock of its own): the worker's scheduler gives it the
database's ``now()``. Cron expressions are parsed and walked by ``cronsim``, which follows
Debian cron through daylight-saving changes (a job at a fixed local time runs once on the
day the clocks go back, and at the first valid minute on the day they go forward), rather
than by a parser of our own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from outbox_worker.errors import TaskDefinitionError
from outbox_worker.names import NAME_PATTERN, is_valid_name

Missed = Literal["skip", "latest"] | int
"""What to do with ticks that passed while no worker ran (ticks later than ``grace``):
``"skip"`` none of them, ``"latest"`` the most recent one (unless a tick on time runs
anyway), or an ``int`` N: up to the N most recent."""

DEFAULT_GRACE = timedelta(minutes=1)
# A bound on the missed ticks one schedule may catch up at once: a per-second schedule
# whose workers were down for a day must not enqueue 86,400 jobs in one transaction.
MAX_MISSED = 1000


@dataclass(frozen=True, slots=True)
class Due:
    """What one look at a schedule decides: the ticks to enqueue now (oldest first), how many
    missed ticks the policy passed over, and the next tick after ``now``."""

    ticks: list[datetime]
    skipped: int
    next_tick: datetime


@dataclass(frozen=True, slots=True)
class Schedule:
    """A job enqueued on a cron expression: ``task`` with ``args`` at every tick.

    ``cron`` has the five standard fields (minute hour day month weekday) or six, seconds
    first. ``timezone`` is an IANA name: the expression is read in that zone's wall clock.
    A tick that is later than ``grace`` when a worker first looks at it counts as missed and
    follows ``missed``; ticks within ``grace`` all run, so a busy or restarting worker does
    not lose one.
    """

    name: str
    task: str
    cron: str
    args: Mapping[str, Any] = field(default_factory=dict)
    timezone: str = "UTC"
    missed: Missed = "latest"
    grace: timedelta = DEFAULT_GRACE

    def __post_init__(self) -> None:
        where = f"schedule {self.name!r}"
        if not is_valid_name(self.name):
            raise TaskDefinitionError(f"schedule name {self.name!r} must match {NAME_PATTERN}")
        if not isinstance(self.cron, str) or len(self.cron.split()) not in (5, 6):
            raise TaskDefinitionError(
                f"{where}: cron {self.cron!r} must have five fields (minute hour day month "
                "weekday) or six (seconds first)"
            )
        try:
            CronSim(self.cron, datetime.now(UTC))
        except CronSimError as exc:
            raise TaskDefinitionError(f"{where}: cron {self.cron!r}: {exc}") from exc
        self.zone()  # raises for an unknown time zone
        if isinstance(self.missed, bool) or not (
            self.missed in ("skip", "latest")
            or (isinstance(self.missed, int) and 0 <= self.missed <= MAX_MISSED)
        ):
            raise TaskDefinitionError(
                f"{where}: missed must be 'skip', 'latest' or a count from 0 to {MAX_MISSED}, "
                f"not {self.missed!r}"
            )
        if not isinstance(self.grace, timedelta) or self.grace < timedelta(0):
            raise TaskDefinitionError(f"{where}: grace must be a timedelta of at least 0")
        if not isinstance(self.args, Mapping):
            raise TaskDefinitionError(f"{where}: args must be a mapping")

    def zone(self) -> tzinfo:
        if self.timezone.upper() == "UTC":
            return UTC  # cronsim keeps its DST fix-ups off for this very object
        try:
            return ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise TaskDefinitionError(
                f"schedule {self.name!r}: unknown time zone {self.timezone!r}"
            ) from exc

    def ticks_after(self, moment: datetime) -> Iterator[datetime]:
        """The ticks strictly after ``moment``, in UTC, oldest first."""
        return (t.astimezone(UTC) for t in CronSim(self.cron, moment.astimezone(self.zone())))

    def ticks_before(self, moment: datetime) -> Iterator[datetime]:
        """The ticks at or before ``moment``, in UTC, newest first."""
        # cronsim's reverse walk from a whole second starts strictly before it; a tick
        # exactly at ``moment`` counts.
        start = (moment.astimezone(self.zone()) + timedelta(seconds=1)).replace(microsecond=0)
        return (t.astimezone(UTC) for t in CronSim(self.cron, start, reverse=True))

    def next_tick(self, moment: datetime) -> datetime:
        return next(self.ticks_after(moment))

    def due(self, last: datetime, now: datetime) -> Due:
        """The ticks to enqueue at ``now``, the latest tick already dealt with being ``last``.

        Ticks in ``(max(last, now - grace), now]`` are on time and all run. Older ones, back
        to ``last``, were missed; ``missed`` says which of them run too.
        """
        on_time_from = max(last, now - self.grace)
        on_time = list(itertools.takewhile(lambda t: t <= now, self.ticks_after(on_time_from)))
        missed: list[datetime] = []
        if last < on_time_from:
            recent = itertools.takewhile(lambda t: t > last, self.ticks_before(on_time_from))
            if self.missed == "latest":
                wanted = 0 if on_time else 1
            elif self.missed == "skip":
                wanted = 0
            else:
                wanted = int(self.missed)
            # Count what is passed over, up to a bound: walking a per-second schedule back
            # over a month-long outage only to count it would stall the scheduler.
            seen = list(itertools.islice(recent, MAX_MISSED + 1))
            missed = seen[:wanted][::-1]
            skipped = len(seen) - len(missed)
        else:
            skipped = 0
        return Due(missed + on_time, skipped, self.next_tick(now))

    def key(self, tick: datetime) -> str:
        """The unique key of this schedule's job for ``tick``: a tick is enqueued once."""
        return f"{self.name}@{tick.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
