"""The gauges behind --metrics-port that only the database knows: queue depth, the oldest due
job, paused queues, workers alive; refreshed every metrics interval from three cheap
queries."""

from __future__ import annotations

import asyncio

import asyncpg

from outbox_worker import db, metrics, sql
from outbox_worker._worker.slots import Slots


class Gauges:
    name = "gauges"

    def __init__(
        self, *, pool: asyncpg.Pool, slots: Slots, lease_seconds: float, interval: float
    ) -> None:
        self._pool = pool
        self._slots = slots
        self._lease_seconds = lease_seconds
        self._interval = interval

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:
                if not db.is_transient(exc):
                    raise
            metrics.SLOTS_IN_USE.set(len(self._slots.held))
            await asyncio.sleep(self._interval)

    async def refresh(self) -> None:
        rows = await db.fetch(self._pool, "gauges", sql.QUEUE_ACTIVE_STATS, give_up_after=5.0)
        metrics.refresh_queue_gauges(rows)
        settings = await db.fetch(self._pool, "gauges", sql.QUEUE_SETTINGS_LIST, give_up_after=5.0)
        metrics.refresh_pause_gauges(settings)
        alive = await db.fetch(
            self._pool,
            "gauges",
            *sql.bind(sql.WORKERS_ALIVE_PG, seconds=self._lease_seconds * 2),
            give_up_after=5.0,
        )
        metrics.WORKERS_ALIVE.set(len(alive))
