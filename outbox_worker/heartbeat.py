"""Keeps the leases of in-flight jobs alive, and notices when the event loop cannot.

The cadence derives from the lease (a third of it), so a missed beat or two is survivable.
A handler that blocks the event loop stops the heartbeat with it; the watchdog thread sees
that and says so (PRINCIPLES rule 1), because a lease that lapses silently means the job
runs twice.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import asyncpg
import structlog

from outbox_worker import db, sql
from outbox_worker.db import sleep_or_stop


class Heartbeat:
    """Every third of a lease: extend every lease in one statement, say the worker is alive,
    and pass on the cancel requests an operator made for jobs in flight."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        worker_id: str,
        queues: list[str],
        concurrency: int,
        lease_seconds: float,
        in_flight: Callable[[], list[tuple[int, int]]],
        on_cancel_requested: Callable[[list[int]], None],
        stop: asyncio.Event,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._pool = pool
        self._worker_id = worker_id
        self._queues = queues
        self._concurrency = concurrency
        self._lease = lease_seconds
        self._in_flight = in_flight
        self._on_cancel_requested = on_cancel_requested
        self._stop = stop
        self._log = log
        self.interval = lease_seconds / 3

    async def run(self) -> None:
        while not await sleep_or_stop(self._stop, self.interval):
            try:
                await self.beat()
            except Exception as exc:
                if not db.is_transient(exc):
                    raise
                self._log.warning("heartbeat_missed", error=f"{type(exc).__name__}: {exc}")

    async def beat(self) -> None:
        # A beat that cannot get through within the lease is pointless: the next one will
        # try again, and the fence protects every write meanwhile.
        rows = await db.retrying("heartbeat", self._beat_once, give_up_after=self._lease)
        cancel = [row["id"] for row in rows if row["cancel_requested"]]
        if cancel:
            self._on_cancel_requested(cancel)

    async def _beat_once(self) -> list[asyncpg.Record]:
        jobs = self._in_flight()
        async with self._pool.acquire(timeout=self._lease) as conn:
            await conn.execute(
                sql.WORKER_HEARTBEAT, self._worker_id, self._queues, self._concurrency, len(jobs)
            )
            if not jobs:
                return []
            rows: list[asyncpg.Record] = await conn.fetch(
                sql.JOB_EXTEND_LEASES,
                [job_id for job_id, _ in jobs],
                [attempt for _, attempt in jobs],
                self._worker_id,
                self._lease,
            )
        if len(rows) < len(jobs):
            extended = {row["id"] for row in rows}
            self._log.debug("leases_not_extended", jobs=[j for j, _ in jobs if j not in extended])
        return rows

    async def goodbye(self) -> None:
        """A clean stop removes the worker's row; a killed worker's row ages out."""
        await db.fetch(self._pool, "goodbye", sql.WORKER_DELETE, self._worker_id, give_up_after=2.0)


class LoopWatchdog:
    """A thread that pings the event loop and logs when it stays blocked too long."""

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        threshold: float,
        in_flight: Callable[[], list[tuple[int, int]]],
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._loop = loop
        self._threshold = threshold
        self._in_flight = in_flight
        self._log = log
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="outbox-loop-watchdog", daemon=True
        )
        self.blocked_count = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self._threshold)):
            answered = threading.Event()
            started = time.monotonic()
            try:
                self._loop.call_soon_threadsafe(answered.set)
            except RuntimeError:
                return  # the loop is closed
            if answered.wait(self._threshold):
                continue
            self.blocked_count += 1
            self._log.error(
                "event_loop_blocked",
                seconds=round(time.monotonic() - started, 2),
                jobs=[job_id for job_id, _ in self._in_flight()],
                hint="a handler is running blocking code; leases cannot be renewed meanwhile "
                "(use asyncio.to_thread for blocking calls)",
            )
            while not answered.wait(1.0):
                if self._stopped.is_set():
                    return
            self._log.warning("event_loop_unblocked", seconds=round(time.monotonic() - started, 2))
