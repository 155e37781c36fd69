"""Fires the registry's schedules: every worker runs one, and the database lets one worker at
a time enqueue each schedule's due ticks (outbox_worker.schedules says how it stays exact)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta

import asyncpg
import structlog

from outbox_worker import db, metrics, sql
from outbox_worker.errors import TaskDefinitionError
from outbox_worker.registry import Registry
from outbox_worker.schedules import Schedule


class Scheduler:
    """Declares the registry's schedules at start, then wakes at the soonest next tick (at
    most ``interval`` later, so a schedule another worker declared or fired is seen soon)
    and enqueues what is due, each schedule in a transaction of its own."""

    name = "scheduler"
    # A schedule locked by another worker is due again for us only once that worker commits:
    # look again this soon rather than spin.
    BUSY_RETRY = 0.05

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        registry: Registry,
        interval: float,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._pool = pool
        self._registry = registry
        self._names = [schedule.name for schedule in registry.schedules()]
        self._interval = interval
        self._log = log

    async def run(self) -> None:
        await db.retrying("schedules", self.declare)
        while True:
            wait = await db.retrying("schedules", self.fire_once)
            await asyncio.sleep(wait)

    async def declare(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            now = await conn.fetchval("SELECT now()")
            for schedule in self._registry.schedules():
                spec = self._registry.get(schedule.task)
                assert spec is not None  # Registry.schedule() checked it
                await conn.execute(
                    *sql.bind(
                        sql.SCHEDULE_DECLARE,
                        name=schedule.name,
                        task=schedule.task,
                        queue=spec.queue,
                        args=json.dumps(dict(schedule.args)),
                        priority=spec.priority,
                        max_attempts=spec.max_attempts,
                        cron=schedule.cron,
                        timezone=schedule.timezone,
                        missed=str(schedule.missed),
                        grace_seconds=schedule.grace.total_seconds(),
                        next_tick=schedule.next_tick(now),
                    )
                )
        self._log.info("schedules_declared", schedules=self._names)

    async def fire_once(self) -> float:
        """Enqueue every due tick of this worker's schedules, in one transaction; seconds
        until it should look again."""
        async with self._pool.acquire() as conn, conn.transaction():
            for row in await conn.fetch(*sql.bind(sql.SCHEDULES_DUE, names=self._names)):
                await self._fire(conn, row)
        soonest = await self._pool.fetchval(*sql.bind(sql.SCHEDULES_SOONEST, names=self._names))
        if soonest is None:
            return self._interval
        return float(min(self._interval, max(soonest, self.BUSY_RETRY)))

    async def _fire(self, conn: asyncpg.Connection, row: asyncpg.Record) -> None:
        """One schedule's due ticks, by the row's definition: during a rolling deploy every
        worker fires what the last one to start declared."""
        try:
            schedule = Schedule(
                name=row["name"],
                task=row["task"],
                cron=row["cron"],
                timezone=row["timezone"],
                missed=int(row["missed"]) if row["missed"].isdigit() else row["missed"],
                grace=timedelta(seconds=row["grace_seconds"]),
            )
        except TaskDefinitionError as exc:
            # Edited by hand into something no worker can read: said once a minute, until
            # the next start declares it again from the code.
            self._log.error("schedule_invalid", schedule=row["name"], error=str(exc))
            await self._advance(conn, row, [], [], row["last_tick"], row["now"] + _RETRY_INVALID)
            return
        now = row["now"]
        due = schedule.due(row["last_tick"], now)
        last_tick = next(schedule.ticks_before(now), row["last_tick"])
        enqueued = await self._advance(
            conn,
            row,
            due.ticks,
            [schedule.key(tick) for tick in due.ticks],
            max(last_tick, row["last_tick"]),
            due.next_tick,
        )
        if due.skipped:
            metrics.SCHEDULE_TICKS.labels(schedule.name, "skipped").inc(due.skipped)
            self._log.warning(
                "schedule_ticks_missed",
                schedule=schedule.name,
                skipped=due.skipped,
                policy=str(schedule.missed),
                since=row["last_tick"].isoformat(),
            )
        for job in enqueued:
            metrics.SCHEDULE_TICKS.labels(schedule.name, "enqueued").inc()
            self._log.info(
                "schedule_enqueued",
                schedule=schedule.name,
                tick=job["run_at"].isoformat(),
                job_id=job["id"],
            )

    async def _advance(
        self,
        conn: asyncpg.Connection,
        row: asyncpg.Record,
        ticks: list[datetime],
        keys: list[str],
        last_tick: datetime,
        next_tick: datetime,
    ) -> list[asyncpg.Record]:
        """Enqueue ``ticks`` and move the row on to ``last_tick`` and ``next_tick``: the jobs
        that were written (a tick whose key is taken writes none)."""
        jobs: list[asyncpg.Record] = await conn.fetch(
            *sql.bind(
                sql.SCHEDULE_ADVANCE,
                name=row["name"],
                task=row["task"],
                queue=row["queue"],
                args=row["args"],
                priority=row["priority"],
                max_attempts=row["max_attempts"],
                ticks=ticks,
                keys=keys,
                last_tick=last_tick,
                next_tick=next_tick,
            )
        )
        return jobs


# How long a schedule that no worker can read waits before it is looked at (and logged) again.
_RETRY_INVALID = timedelta(minutes=1)
