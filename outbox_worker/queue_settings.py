"""Settings per queue that every worker obeys: a pause, and a limit on how many of the queue's
jobs run at once across all workers and hosts. One implementation behind every face (the
CLI, the HTTP API, the dashboard); plain SQL on ``outbox_queues`` works the same way.

Each change is a row of ``outbox_queues``; the functions never commit (the caller's
transaction decides). Workers read the settings of the queues they serve every poll interval,
and their claims read the row itself, so a change is in force on every worker within one
poll interval:

- **paused**: no job of the queue starts. Jobs running finish; jobs a worker claimed ahead
  and has not started are handed back.
- **concurrency**: at most that many jobs of the queue run at once, counted from their
  leases: a job counts from its claim until its outcome is written or its lease lapses (its
  worker killed), never by a counter that a crash could leave wrong.
- **key_concurrency**: at most that many jobs of one concurrency key (given at enqueue: a
  tenant, a customer) run at once, counted the same way; the keys are served in turn, so a
  key's backlog never holds back another key's jobs.
- **rate_limit** per **rate_period** seconds: at most that many of its jobs start (are
  claimed) in any window of that length, across every worker.
- **key_rate_limit** per **key_rate_period** seconds: the same for the jobs of each
  concurrency key on its own; a key at its rate is passed over, never waited for.
- **breaker_threshold**: the queue pauses itself (``paused_by`` 'breaker') once one of its
  tasks has failed that many attempts in a row; an operator resumes it.

A queue without a row has none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text

from outbox_worker import admin, sql
from outbox_worker.admin import AdminSession
from outbox_worker.errors import InvalidRequest
from outbox_worker.formatting import format_duration
from outbox_worker.jobs import JobState
from outbox_worker.names import NAME_PATTERN, is_valid_name

# The largest limit accepted: a column of type integer, and far past any pool of workers.
MAX_CONCURRENCY = 1_000_000
MAX_REASON_LENGTH = 500
# The longest rate window: a day (the table's CHECK).
MAX_RATE_PERIOD = 86_400


@dataclass(frozen=True, slots=True)
class QueueSettings:
    name: str
    concurrency: int | None = None
    key_concurrency: int | None = None
    rate_limit: int | None = None
    rate_period: float = 1.0
    key_rate_limit: int | None = None
    key_rate_period: float = 1.0
    breaker_threshold: int | None = None
    paused_at: datetime | None = None
    paused_by: str | None = None
    pause_reason: str | None = None
    updated_at: datetime | None = None

    @property
    def paused(self) -> bool:
        return self.paused_at is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue": self.name,
            "concurrency": self.concurrency,
            "key_concurrency": self.key_concurrency,
            "rate_limit": self.rate_limit,
            "rate_period": self.rate_period,
            "key_rate_limit": self.key_rate_limit,
            "key_rate_period": self.key_rate_period,
            "breaker_threshold": self.breaker_threshold,
            "paused": self.paused,
            "paused_at": None if self.paused_at is None else self.paused_at.isoformat(),
            "paused_by": self.paused_by,
            "pause_reason": self.pause_reason,
            "updated_at": None if self.updated_at is None else self.updated_at.isoformat(),
        }

    def describe(self) -> str:
        """What workers obey now, on one line: the line the CLI prints after a change and the
        dashboard flashes, so both faces word it alike. The pause reason is as written; a
        face escapes it for its medium."""
        limits = [
            *([] if self.concurrency is None else [f"at most {self.concurrency}"]),
            *([] if self.key_concurrency is None else [f"{self.key_concurrency} per key"]),
        ]
        limit = f"{', '.join(limits)} running at once" if limits else None
        if self.paused:
            reason = f" ({self.pause_reason})" if self.pause_reason else ""
            state = f"paused{reason}" + ("" if limit is None else f"; when resumed, {limit}")
        else:
            state = limit or "running, no limit"
        if self.rate_limit is not None:
            state += f"; at most {self.rate_limit} started per {format_duration(self.rate_period)}"
        if self.key_rate_limit is not None:
            state += (
                f"; at most {self.key_rate_limit} started per key per "
                f"{format_duration(self.key_rate_period)}"
            )
        if self.breaker_threshold is not None:
            state += f"; pauses itself after {self.breaker_threshold} failures in a row"
        return state


@dataclass(frozen=True, slots=True)
class QueueView:
    """A queue as the admin faces show it: its numbers and its settings."""

    stats: admin.QueueStats
    settings: QueueSettings


async def queue_views(session: AdminSession, *, window_seconds: float) -> list[QueueView]:
    """Every queue with jobs or settings, by name: a queue paused or limited before its first
    job (or after its last was pruned) stays in sight, where it can be resumed."""
    stats = {
        entry.queue: entry
        for entry in await admin.queue_stats(session, window_seconds=window_seconds)
    }
    settings = {entry.name: entry for entry in await list_settings(session)}
    for name in settings.keys() - stats.keys():
        stats[name] = admin.QueueStats(
            name,
            depth={state.value: 0 for state in JobState},
            finished_recently={state.value: 0 for state in admin.FINISHED},
        )
    return [
        QueueView(stats[name], settings.get(name, QueueSettings(name))) for name in sorted(stats)
    ]


async def list_settings(session: AdminSession) -> list[QueueSettings]:
    """Every queue that has settings, by name."""
    rows = await session.execute(text(sql.QUEUE_SETTINGS_LIST))
    return [QueueSettings(**dict(row)) for row in rows.mappings()]


async def get_settings(session: AdminSession, queue: str) -> QueueSettings:
    """One queue's settings; a queue without a row has the defaults (no limit, running)."""
    _check_queue(queue)
    for entry in await list_settings(session):
        if entry.name == queue:
            return entry
    return QueueSettings(queue)


async def set_concurrency(session: AdminSession, queue: str, limit: int | None) -> QueueSettings:
    """At most ``limit`` jobs of ``queue`` running at once across every worker; None lifts
    the limit. Jobs running when a limit is set count against it."""
    _check_queue(queue)
    _check_count("concurrency", limit, "no limit")
    return await _write(session, sql.QUEUE_SET_CONCURRENCY, name=queue, concurrency=limit)


async def set_key_concurrency(
    session: AdminSession, queue: str, limit: int | None
) -> QueueSettings:
    """At most ``limit`` jobs of one concurrency key of ``queue`` running at once across
    every worker, the keys served in turn; None lifts the limit."""
    _check_queue(queue)
    _check_count("key_concurrency", limit, "no limit per key")
    return await _write(session, sql.QUEUE_SET_KEY_CONCURRENCY, name=queue, key_concurrency=limit)


async def set_rate(
    session: AdminSession, queue: str, limit: int | None, period: float = 1.0
) -> QueueSettings:
    """At most ``limit`` jobs of ``queue`` start in any window of ``period`` seconds, across
    every worker; None lifts the limit."""
    _check_queue(queue)
    _check_count("rate_limit", limit, "no rate limit")
    _check_period("rate_period", period)
    return await _write(
        session, sql.QUEUE_SET_RATE, name=queue, rate_limit=limit, rate_period=float(period)
    )


async def set_key_rate(
    session: AdminSession, queue: str, limit: int | None, period: float = 1.0
) -> QueueSettings:
    """At most ``limit`` jobs of one concurrency key of ``queue`` start in any window of
    ``period`` seconds, across every worker, the other keys going on meanwhile; None lifts
    the limit."""
    _check_queue(queue)
    _check_count("key_rate_limit", limit, "no rate limit per key")
    _check_period("key_rate_period", period)
    return await _write(
        session,
        sql.QUEUE_SET_KEY_RATE,
        name=queue,
        key_rate_limit=limit,
        key_rate_period=float(period),
    )


async def set_breaker(session: AdminSession, queue: str, threshold: int | None) -> QueueSettings:
    """Pause ``queue`` once one of its tasks fails ``threshold`` attempts in a row (counted
    across every worker, a success starting the count again); None turns it off."""
    _check_queue(queue)
    _check_count("breaker_threshold", threshold, "no breaker")
    return await _write(session, sql.QUEUE_SET_BREAKER, name=queue, breaker_threshold=threshold)


async def pause(
    session: AdminSession, queue: str, *, reason: str | None = None, by: str = "operator"
) -> QueueSettings:
    """Start no more jobs of ``queue`` until it is resumed; those running finish."""
    _check_queue(queue)
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON_LENGTH):
        raise InvalidRequest(f"a pause reason is text of at most {MAX_REASON_LENGTH} characters")
    return await _write(session, sql.QUEUE_PAUSE, name=queue, by=by, reason=reason or None)


async def resume(session: AdminSession, queue: str) -> QueueSettings:
    """Let ``queue`` start jobs again (whoever paused it: an operator or the breaker)."""
    _check_queue(queue)
    row = (await session.execute(text(sql.QUEUE_RESUME), {"name": queue})).mappings().first()
    return QueueSettings(queue) if row is None else QueueSettings(**dict(row))


async def _write(session: AdminSession, statement: str, **params: Any) -> QueueSettings:
    row = (await session.execute(text(statement), params)).mappings().one()
    return QueueSettings(**dict(row))


def _check_count(what: str, value: object, none_means: str) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONCURRENCY
    ):
        raise InvalidRequest(
            f"{what} must be a whole number from 1 to {MAX_CONCURRENCY}, or none for "
            f"{none_means}; got {value!r}"
        )


def _check_period(what: str, period: object) -> None:
    if (
        isinstance(period, bool)
        or not isinstance(period, int | float)
        or not 0 < period <= MAX_RATE_PERIOD
    ):
        raise InvalidRequest(
            f"{what} must be more than 0 and at most {MAX_RATE_PERIOD} seconds; got {period!r}"
        )


def _check_queue(queue: object) -> None:
    if not is_valid_name(queue):
        raise InvalidRequest(f"queue names must match {NAME_PATTERN}; got {queue!r}")
