"""The one account of a worker's slots, kept by the worker and read and changed by its
services: the claimer reserves rows and offers what it claimed, the executor asks why a
handler was stopped, the heartbeat extends the leases of the held jobs and stops handlers,
the completer frees rows as outcomes are written.

Two limits. At most ``concurrency`` handlers run at once, counting the threads of sync
handlers that run on after their attempt ended (a thread cannot be interrupted). Besides
them, up to ``ahead`` jobs may be claimed ahead and wait here, so that a slot whose handler
ends starts its next job at once instead of waiting on a round trip to the database. A row
counts from the moment a claim asks for it (reserved) until its outcome is written (held):
the ones running, waiting, or ended with their outcome on its way. Counting all of them is
what lets claims overlap, and ride on the statement that writes successes, without ever
holding more than ``concurrency + ahead`` rows or running more than ``concurrency``
handlers.

How many jobs are worth claiming ahead follows from Little's law: as many as the slots
finish before a finished job's replacement arrives, which takes up to two round trips to the
database (the write under way, then the one that carries its success and the claim of its
replacement), and that doubled for the spread. With
millisecond jobs that is dozens; with jobs of a second or more it is none, so a worker never
hoards long jobs that an idle worker could run (prefetching's classic trap). Both figures
are moving averages of what this worker sees; until its first job ends it claims for its
free slots only.

A job claimed ahead that never starts is handed back when the worker stops, with its
attempt taken back; one on its last attempt is only ever claimed for a slot free at once
(see the claim in sql/worker.py), so that a worker killed with jobs waiting never leaves the
rescuer a job to bury that did not run.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from outbox_worker import metrics
from outbox_worker._worker.claims import ClaimedJob
from outbox_worker._worker.outcomes import (
    Abandoned,
    Cancelled,
    Outcome,
    StopReason,
    Unclaimed,
)


@dataclass(frozen=True, slots=True)
class Reservation:
    """The rows one claim may take: ``asked`` in all, of which at most ``asked - ahead`` may
    be on their last attempt (they start at once)."""

    asked: int
    ahead: int

    def __bool__(self) -> bool:
        return self.asked > 0


NOTHING = Reservation(0, 0)

# What a job that waited and never started ends as, by why it was stopped.
_UNSTARTED: dict[StopReason, Callable[[int, int], Outcome]] = {
    StopReason.SHUTDOWN: Unclaimed,
    StopReason.CANCEL: Cancelled,
    StopReason.LEASE: Abandoned,
}


class Slots:
    def __init__(
        self, concurrency: int, *, ahead: int = 0, log: structlog.typing.FilteringBoundLogger
    ) -> None:
        self.concurrency = concurrency
        self.ahead = ahead
        # Moving averages (seconds): a handler's run, and a claim's round trip.
        self.job_seconds: float | None = None
        self.trip_seconds: float | None = None
        # Claimed rows whose outcome is not written yet, running or not.
        self.held: dict[int, ClaimedJob] = {}
        # Progress reported by running handlers (JSON text) that no heartbeat wrote yet.
        self.progress: dict[int, str] = {}
        # Rung when slots are freed or the worker stops: the producer may claim again.
        self.changed = asyncio.Event()
        self.closed = False
        self.written = 0
        self._log = log
        self._reserved = 0
        # Of the reserved rows, those promised a free slot (they may be last attempts).
        self._reserved_now = 0
        self._claims_in_flight = 0
        self._running: dict[int, asyncio.Task[None]] = {}
        # Threads of sync handlers still running after their attempt ended (a timeout, a
        # stop): nothing can interrupt them, so each keeps its slot until it returns.
        self._lingering = 0
        self._started_at: dict[int, float] = {}
        # Claimed ahead, by id in the order they start; last attempts in front.
        self._waiting: collections.OrderedDict[int, ClaimedJob] = collections.OrderedDict()
        self._execute: Callable[[ClaimedJob], Coroutine[Any, Any, None]] | None = None
        self._put: Callable[[Outcome], None] | None = None
        self._fresh: Callable[[ClaimedJob, float], bool] | None = None
        # Why the worker stopped a handler it stopped (operator cancel, shutdown, lease).
        self._stopping: dict[int, StopReason] = {}
        # Attempts started whose outcome could not be written: their rows may still be
        # running under this worker's name until a rescuer takes them back, so the hand-back
        # of lost claims must leave them alone. Only grows when writes fail for good.
        self._abandoned: set[tuple[int, int]] = set()

    def attach(
        self,
        *,
        execute: Callable[[ClaimedJob], Coroutine[Any, Any, None]],
        put: Callable[[Outcome], None],
        fresh: Callable[[ClaimedJob, float], bool],
    ) -> None:
        """How a job is run (a coroutine that calls ``finished`` when its handler ends),
        where the outcome of a job that never started goes, and whether a job's lease
        (at a time.monotonic()) is still good to start it on."""
        self._execute = execute
        self._put = put
        self._fresh = fresh

    # Claims ------------------------------------------------------------------------------

    def reserve(self, *, freed: int = 0) -> Reservation:
        """Reserve every row there is room for in one claim; ``freed`` are held rows the
        same statement gives back. Nothing once closed."""
        if self.closed:
            return NOTHING
        busy = len(self.held) + self._lingering
        asked = self.concurrency + self.worth_ahead() - busy - self._reserved + freed
        if asked <= 0:
            return NOTHING
        running = len(self._running) + self._lingering
        now = min(asked, max(0, self.concurrency - running - self._reserved_now))
        self._reserved += asked
        self._reserved_now += now
        self._claims_in_flight += 1
        return Reservation(asked, asked - now)

    def settle(self, reservation: Reservation) -> None:
        """A claim has answered (or failed): its reservation ends; its rows are offered next."""
        self._reserved -= reservation.asked
        self._reserved_now -= reservation.asked - reservation.ahead
        self._claims_in_flight -= 1

    def worth_ahead(self) -> int:
        """Jobs worth claiming ahead now (see the module's docstring), at most ``ahead``."""
        if not self.ahead or self.job_seconds is None or self.trip_seconds is None:
            return 0
        finishing = 4 * self.concurrency * self.trip_seconds / max(self.job_seconds, 1e-5)
        return min(self.ahead, math.ceil(finishing))

    def trip(self, seconds: float) -> None:
        """A claim's round trip took this long."""
        self.trip_seconds = _moving(self.trip_seconds, seconds)

    @property
    def claims_in_flight(self) -> int:
        return self._claims_in_flight

    def close(self) -> None:
        """No more claims, and no more starts of jobs claimed ahead: the worker is stopping.
        Those waiting are handed back at once, for other workers to run."""
        self.closed = True
        if self._waiting:
            self._log.info("claimed_ahead_handed_back", jobs=list(self._waiting))
        while self._waiting:
            self._unstarted(self._waiting.popitem(last=False)[1], StopReason.SHUTDOWN)
        self.changed.set()

    def idle(self) -> bool:
        """Nothing held and no claim in flight."""
        return not self.held and not self._claims_in_flight

    def started(self) -> list[tuple[int, int]]:
        """Every attempt this worker claimed whose row may still be running in its name."""
        return [(job.id, job.attempt) for job in self.held.values()] + list(self._abandoned)

    # Handlers ----------------------------------------------------------------------------

    def hold(self, job: ClaimedJob) -> None:
        self.held[job.id] = job

    def offer(self, job: ClaimedJob) -> None:
        """A job just claimed: held, then started if a slot is free, else waiting (a last
        attempt in front: its claim was promised a slot). Handed back when closed."""
        self.hold(job)
        if self.closed:
            self._unstarted(job, StopReason.SHUTDOWN)
        else:
            self._waiting[job.id] = job
            if job.attempt >= job.max_attempts:
                self._waiting.move_to_end(job.id, last=False)
        self._fill()

    def report_progress(self, job_id: int, progress: str) -> None:
        """A running handler's latest progress, for the next heartbeat to write."""
        if job_id in self.held:
            self.progress[job_id] = progress

    def finished(self, job_id: int) -> None:
        """A handler has ended (its outcome is on its way): its slot takes the next job."""
        if self._running.pop(job_id, None) is not None:
            ran = time.monotonic() - self._started_at.pop(job_id)
            self.job_seconds = _moving(self.job_seconds, ran)
        self._fill()

    def linger(self, change: int) -> None:
        """A sync handler's thread runs on past its attempt (+1), or has now returned (-1)."""
        self._lingering += change
        if change < 0:
            self._fill()
            self.changed.set()

    def _fill(self) -> None:
        while (
            self._waiting
            and not self.closed
            and len(self._running) + self._lingering + self._reserved_now < self.concurrency
        ):
            _, job = self._waiting.popitem(last=False)
            assert self._execute is not None, "Slots.attach first"
            assert self._fresh is not None, "Slots.attach first"
            now = time.monotonic()
            if not self._fresh(job, now):
                self._unstarted(job, StopReason.LEASE)
                continue
            self._started_at[job.id] = now
            self._running[job.id] = asyncio.create_task(self._execute(job))

    def _unstarted(self, job: ClaimedJob, reason: StopReason) -> None:
        assert self._put is not None, "Slots.attach first"
        self._put(_UNSTARTED[reason](job.id, job.attempt))

    def waiting_in(self, queues: set[str]) -> list[int]:
        """The jobs claimed ahead, not started, of these queues."""
        return [job.id for job in self._waiting.values() if job.queue in queues]

    def is_running(self, job_id: int) -> bool:
        return job_id in self._running

    def unfinished(self, job_id: int) -> bool:
        """Running, or claimed ahead and waiting to start."""
        return job_id in self._running or job_id in self._waiting

    def running(self) -> dict[int, asyncio.Task[None]]:
        return dict(self._running)

    def stop_reason(self, job_id: int) -> StopReason | None:
        return self._stopping.get(job_id)

    def stop(self, job_ids: list[int], reason: StopReason) -> None:
        """Cancel these handlers, remembering why so that each ends in the right outcome. A
        lease that is lapsing overrides any other reason: the job must not be written as
        anything but abandoned to the rescuer. A job waiting to start never starts: it ends
        as the reason says (handed back, cancelled, or abandoned)."""
        for job_id in job_ids:
            waiting = self._waiting.pop(job_id, None)
            if waiting is not None:
                self._unstarted(waiting, reason)
                continue
            task = self._running.get(job_id)
            current = self._stopping.get(job_id)
            if task is None or current is reason or current is StopReason.LEASE:
                continue
            self._stopping[job_id] = reason
            if reason is StopReason.CANCEL:
                self._log.info("job_cancel_requested", job_id=job_id)
            elif reason is StopReason.LEASE:
                self._log.error(
                    "job_stopped_lease_lapsing",
                    job_id=job_id,
                    hint="its lease could not be extended (row locked by another session, "
                    "lease taken over, or database away); a rescuer runs it again once the "
                    "lease has lapsed",
                )
            task.cancel()

    def stop_all(self) -> None:
        """Cancel every handler still running: the drain timeout is over. One already being
        stopped keeps its reason, and is cancelled again in case it swallowed the first."""
        for job_id, task in self._running.items():
            self._stopping.setdefault(job_id, StopReason.SHUTDOWN)
            task.cancel()

    # Outcomes ----------------------------------------------------------------------------

    def release(self, done: list[Outcome], abandoned: list[Outcome]) -> None:
        """Outcomes written (or no longer ours) and outcomes given up on free their slots."""
        for outcome in [*done, *abandoned]:
            job = self.held.get(outcome.job_id)
            if job is not None and job.attempt == outcome.attempt:
                del self.held[outcome.job_id]
                self._stopping.pop(outcome.job_id, None)
                self.progress.pop(outcome.job_id, None)
        self._abandoned.update((outcome.job_id, outcome.attempt) for outcome in abandoned)
        metrics.SLOTS_IN_USE.set(len(self.held))
        self.written += len(done)
        self.changed.set()


def _moving(average: float | None, value: float) -> float:
    """An exponentially weighted moving average over roughly the last 20 values."""
    return value if average is None else average + (value - average) / 20
