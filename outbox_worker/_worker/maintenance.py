"""Background upkeep that needs no user task: rescue expired leases, keep the ready lanes
small, prune finished jobs."""

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


class ReadyLanes:
    """Keeps the claim's reading short whatever snapshot another session holds: promotes jobs
    coming due into the current lane, empties the lane not in use with ``TRUNCATE`` once its
    rows are claimed, and switches lanes every ``SWITCH_EVERY`` seconds (the database function
    ``outbox_ready_maintain`` does each step; migration pgoutbox_0006 explains the lanes).

    Every worker runs one; the function lets one act at a time. A lane whose lock is not
    granted within ``LOCK_WAIT`` (a ``pg_dump`` holds it, say) is left for the next round:
    claims queued behind that lock wait no longer than that.
    """

    name = "ready-lanes"
    INTERVAL = 1.0
    # Under a held snapshot, a claim steps over the dead entries of about two switches' worth
    # of claims; each switch and each emptied lane costs the claims a pause of a few ms.
    SWITCH_EVERY = 2.0
    # Copying this many rows under the lane's lock takes ~20 ms; a lane holding more is left
    # for the claims to empty (its rows are the oldest, so they are claimed first).
    MAX_COPY = 10_000
    LOCK_WAIT = 0.1

    def __init__(self, *, pool: asyncpg.Pool, log: structlog.typing.FilteringBoundLogger) -> None:
        self._pool = pool
        self._log = log

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.INTERVAL)
            await self.maintain_once()

    async def maintain_once(self) -> str:
        """What the step did ('busy' when a lane's lock was not granted in time)."""
        statement = sql.bind(
            sql.READY_MAINTAIN,
            switch_every=self.SWITCH_EVERY,
            max_copy=self.MAX_COPY,
            lock_wait=self.LOCK_WAIT,
        )
        try:
            done: str = await db.retrying(
                "ready-lanes", functools.partial(self._pool.fetchval, *statement)
            )
        except asyncpg.LockNotAvailableError:
            self._log.debug("ready_lane_busy")
            return "busy"
        return done


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
