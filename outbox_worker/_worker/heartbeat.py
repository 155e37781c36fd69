"""Keeps the leases of in-flight jobs alive, and notices when it cannot.

The cadence derives from the lease (a third of it), so a missed beat is survivable. A lease
that could not be extended is acted on before it lapses (see Heartbeat). A handler that
blocks the event loop stops the heartbeat and its guard with it; the watchdog thread sees
that and says so, because a lease that lapses silently means the job runs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import asyncpg
import structlog

from outbox_worker import db, sql
from outbox_worker._worker.claims import ClaimedJob
from outbox_worker._worker.outcomes import StopReason
from outbox_worker._worker.slots import Slots
from outbox_worker.formatting import error_line


class Heartbeat:
    """Every third of a lease: extend every lease in one statement, say the worker is alive,
    and pass on the cancel requests an operator made for jobs in flight.

    A lease that was not extended is never ignored. The beat comes back sooner while one is
    missing (a row locked by another session, a database away), and the guard, which runs
    apart from the beats, stops the handler of any job whose lease is about to lapse
    unextended: once it lapses, another worker may rescue the job and run it again while
    this handler still runs.
    """

    name = "heartbeat"

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        worker_id: str,
        queues: list[str],
        lease_seconds: float,
        slots: Slots,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._pool = pool
        self._worker_id = worker_id
        self._queues = queues
        self._lease = lease_seconds
        self._slots = slots
        self._log = log
        self.interval = lease_seconds / 3
        # A handler is stopped this long before its lease would lapse: time for the
        # cancellation to land before any rescuer may take the job.
        self.margin = lease_seconds / 6
        # (job id, attempt) -> when the last statement that extended its lease was sent
        # (time.monotonic()); the lease runs at least a lease past that.
        self._extended: dict[tuple[int, int], float] = {}

    async def run(self) -> None:
        """Beat, and guard the leases, until cancelled. The worker cancels it last of all:
        jobs finishing during the drain still need their leases, or another worker would
        rescue and run them a second time."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._beats())
            group.create_task(self._guard())

    async def _beats(self) -> None:
        delay = self.interval
        while True:
            await asyncio.sleep(delay)
            try:
                complete = await self.beat()
            except Exception as exc:
                if not db.is_transient(exc):
                    raise
                self._log.warning("heartbeat_missed", error=error_line(exc))
                complete = False
            delay = self.interval if complete else self.interval / 4

    async def beat(self) -> bool:
        """One beat; False when some lease of a running handler was not extended."""
        # A beat that cannot get through soon is retried at the next one; the guard
        # watches the leases meanwhile, and the fence protects every write.
        rows, missed = await db.retrying("heartbeat", self._beat_once, give_up_after=self.interval)
        cancel = [row["id"] for row in rows if row["cancel_requested"]]
        if cancel:
            self._slots.stop(cancel, StopReason.CANCEL)
        return not missed

    async def _beat_once(self) -> tuple[list[asyncpg.Record], list[int]]:
        jobs = list(self._slots.held.values())
        sent = time.monotonic()
        async with self._pool.acquire(timeout=self._lease) as conn:
            await conn.execute(
                *sql.bind(
                    sql.WORKER_HEARTBEAT,
                    worker_id=self._worker_id,
                    queues=self._queues,
                    concurrency=self._slots.concurrency,
                    in_flight=len(jobs),
                )
            )
            if not jobs:
                self._extended.clear()
                return [], []
            progress = [self._slots.progress.get(job.id) for job in jobs]
            rows: list[asyncpg.Record] = await conn.fetch(
                *sql.bind(
                    sql.JOB_EXTEND_LEASES,
                    ids=[job.id for job in jobs],
                    attempts=[job.attempt for job in jobs],
                    progress=progress,
                    worker_id=self._worker_id,
                    lease_seconds=self._lease,
                )
            )
        extended = {row["id"] for row in rows}
        for job, sent_progress in zip(jobs, progress, strict=True):
            # Written; a report made since is left for the next beat.
            if job.id in extended and self._slots.progress.get(job.id) == sent_progress:
                self._slots.progress.pop(job.id, None)
        current = {(job.id, job.attempt) for job in self._slots.held.values()}
        self._extended = {key: at for key, at in self._extended.items() if key in current}
        for job in jobs:
            if job.id in extended:
                self._extended[job.id, job.attempt] = sent
        # A job whose handler has ended may be unextended only because its outcome was
        # written meanwhile; the row of a job running or waiting to start can only be missed
        # for a reason.
        missed = [
            job.id for job in jobs if job.id not in extended and self._slots.unfinished(job.id)
        ]
        if missed:
            self._log.warning(
                "lease_not_extended",
                jobs=missed,
                hint="the row is locked by another session, or no longer held by this "
                "worker; the handler is stopped before its lease lapses unless a beat "
                "extends it first",
            )
        return rows, missed

    async def _guard(self) -> None:
        """Stop handlers whose lease is about to lapse, apart from the beats: a beat may be
        the very thing that is stuck."""
        tick = min(1.0, self.margin)
        while True:
            await asyncio.sleep(tick)
            lapsing = self.lapsing(time.monotonic())
            if lapsing:
                self._slots.stop(lapsing, StopReason.LEASE)

    def lapsing(self, now: float) -> list[int]:
        """Jobs running or waiting to start while their lease ends within the margin."""
        return [
            job.id
            for job in list(self._slots.held.values())
            if not self.fresh(job, now) and self._slots.unfinished(job.id)
        ]

    def fresh(self, job: ClaimedJob, now: float) -> bool:
        """Whether the job's lease runs on past the margin: a job whose lease may lapse
        soon must not start (a stalled worker wakes with jobs waiting whose leases lapsed
        and were rescued meanwhile)."""
        last = max(job.leased_at, self._extended.get((job.id, job.attempt), 0.0))
        return now < last + self._lease - self.margin

    async def goodbye(self) -> None:
        """A clean stop removes the worker's row; a killed worker's row ages out."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await db.fetch(
                    self._pool,
                    "goodbye",
                    *sql.bind(sql.WORKER_DELETE, worker_id=self._worker_id),
                    give_up_after=2.0,
                )


class LoopWatchdog:
    """A thread that pings the event loop and logs when it stays blocked too long."""

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        threshold: float,
        slots: Slots,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._loop = loop
        self._threshold = threshold
        self._slots = slots
        self._log = log
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="outbox-loop-watchdog", daemon=True
        )

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
            self._log.error(
                "event_loop_blocked",
                seconds=round(time.monotonic() - started, 2),
                jobs=list(self._slots.held),
                hint="a handler is running blocking code; leases cannot be renewed meanwhile "
                "(use asyncio.to_thread for blocking calls)",
            )
            while not answered.wait(1.0):
                if self._stopped.is_set():
                    return
            self._log.warning("event_loop_unblocked", seconds=round(time.monotonic() - started, 2))
