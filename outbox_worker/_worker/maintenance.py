"""Background upkeep that needs no user task: rescue expired leases, prune finished jobs."""

from __future__ import annotations

import asyncio
import functools
from datetime import timedelta

import asyncpg
import structlog

from outbox_worker import db, sql

RESCUE_BATCH = 1000
PRUNE_BATCH = 1000
# pg_try_advisory_xact_lock key that makes pruning one worker's job at a time.
PRUNE_LOCK_KEY = 0x6F7574626F78  # "outbox"


class Rescuer:
    """Puts back (or buries) jobs whose worker stopped renewing their lease, within a bounded
    time and with no task the user must write.

    Every worker runs one: SKIP LOCKED lets them share the work, and a job is back in the
    queue within one lease plus one rescue interval of its worker's death.
    """

    name = "rescuer"

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        interval: float,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._pool = pool
        self._interval = interval
        self._log = log

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.rescue_once()

    async def rescue_once(self, until: asyncio.Event | None = None) -> int:
        total = 0
        while True:
            rows = await db.fetch(
                self._pool,
                "rescue",
                *sql.bind(sql.JOB_RESCUE_EXPIRED, limit=RESCUE_BATCH),
                until=until,
            )
            for row in rows:
                self._log.warning(
                    "job_rescued",
                    job_id=row["id"],
                    task=row["task"],
                    state=row["state"],
                    attempt=row["attempts"],
                )
            total += len(rows)
            if len(rows) < RESCUE_BATCH:
                return total


class Pruner:
    """Deletes finished jobs past their state's retention, in batches, one worker at a time."""

    name = "pruner"

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        retention: dict[str, timedelta | None],
        interval: float,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._pool = pool
        self._retention = retention
        self._interval = interval
        self._log = log

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.prune_once()

    async def prune_once(self) -> int:
        total = 0
        for state, keep in self._retention.items():
            if keep is None:
                continue
            while True:
                deleted = await db.retrying("prune", functools.partial(self._batch, state, keep))
                total += deleted
                if deleted < PRUNE_BATCH:
                    break
        if total:
            self._log.info("jobs_pruned", count=total)
        return total

    async def _batch(self, state: str, keep: timedelta) -> int:
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(*sql.bind(sql.MAINTENANCE_TRY_LOCK, key=PRUNE_LOCK_KEY)):
                return 0
            status: str = await conn.execute(
                *sql.bind(
                    sql.JOB_PRUNE_FINISHED_PG,
                    state=state,
                    older_than=keep.total_seconds(),
                    batch=PRUNE_BATCH,
                )
            )
            return int(status.rsplit(" ", 1)[-1])
