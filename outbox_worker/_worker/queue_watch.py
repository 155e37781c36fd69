"""Reads the settings of the worker's queues every poll interval, so that a change made by
SQL, the CLI, the API or the dashboard is in force here within one: a limited queue is
claimed through its limit, and the jobs claimed ahead of a paused queue are handed back
unstarted (its running jobs finish). The claims check both in the database as well; this
only lets the worker act on them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
import structlog

from outbox_worker import db, sql
from outbox_worker._worker.claimer import Claimer
from outbox_worker._worker.outcomes import StopReason
from outbox_worker._worker.slots import Slots

RATE_RETRIES = 20


class QueueWatch:
    name = "queue_watch"

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        queues: Sequence[str],
        claimer: Claimer,
        slots: Slots,
        interval: float,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._pool = pool
        self._queues = list(queues)
        self._claimer = claimer
        self._slots = slots
        self._interval = interval
        self._log = log
        self._paused: set[str] = set()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.read_once()
            except Exception as exc:
                if not db.is_transient(exc):
                    raise

    async def read_once(self) -> None:
        rows = await db.fetch(
            self._pool,
            "queue_watch",
            *sql.bind(sql.QUEUES_WATCH, queues=self._queues),
            give_up_after=5.0,
        )
        limited = frozenset(row["name"] for row in rows if row["limited"])
        windows = [row["rate_period"] for row in rows if row["rate_period"] is not None]
        # A rate frees its places as its window slides: claim again a twentieth of the
        # shortest window after a claim the rate cut short, not a whole poll interval.
        self._claimer.retry_within = min(windows) / RATE_RETRIES if windows else None
        paused = {row["name"] for row in rows if row["paused"]}
        if limited != self._claimer.limited:
            self._log.info("queue_limits_seen", limited=sorted(limited))
            self._claimer.limited = limited
            self._slots.changed.set()
        if paused != self._paused:
            self._log.info("queue_pauses_seen", paused=sorted(paused))
            if self._paused - paused:
                self._slots.changed.set()  # resumed: claim at once
            self._paused = paused
        waiting = self._slots.waiting_in(paused)
        if waiting:
            self._log.info("claimed_ahead_handed_back", jobs=waiting, reason="queue paused")
            self._slots.stop(waiting, StopReason.SHUTDOWN)
