"""The one account of a worker's slots, kept by the worker and read and changed by its
services: the claimer reserves and fills slots, the executor asks why a handler was stopped,
the heartbeat extends the leases of the held jobs and stops handlers, the completer frees
slots as outcomes are written.

A slot is in use from the moment a claim asks for it (reserved) until the outcome of the job
it was filled with is written (held); a claimed job's handler may have ended long before its
outcome is written. Counting both is what lets claims overlap, and ride on the statement that
writes successes, without ever running more than the concurrency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

from outbox_worker import metrics
from outbox_worker._worker.claims import ClaimedJob
from outbox_worker._worker.outcomes import Outcome, StopReason


class Slots:
    def __init__(self, concurrency: int, *, log: structlog.typing.FilteringBoundLogger) -> None:
        self.concurrency = concurrency
        # Claimed rows whose outcome is not written yet, running or not.
        self.held: dict[int, ClaimedJob] = {}
        # Rung when slots are freed or the worker stops: the producer may claim again.
        self.changed = asyncio.Event()
        self.closed = False
        self.written = 0
        self._log = log
        self._reserved = 0
        self._claims_in_flight = 0
        self._running: dict[int, asyncio.Task[None]] = {}
        # Why the worker stopped a handler it stopped (operator cancel, shutdown, lease).
        self._stopping: dict[int, StopReason] = {}
        # Attempts started whose outcome could not be written: their rows may still be
        # running under this worker's name until a rescuer takes them back, so the hand-back
        # of lost claims must leave them alone. Only grows when writes fail for good.
        self._abandoned: set[tuple[int, int]] = set()

    # Claims ------------------------------------------------------------------------------

    def reserve(self, most: int, *, freed: int = 0) -> int:
        """Reserve up to ``most`` free slots for one claim; ``freed`` are held slots the same
        statement gives back. 0 once closed."""
        if self.closed:
            return 0
        asked = min(most, self.concurrency - len(self.held) - self._reserved + freed)
        if asked <= 0:
            return 0
        self._reserved += asked
        self._claims_in_flight += 1
        return asked

    def settle(self, asked: int) -> None:
        """A claim has answered (or failed): its reservation ends, its rows are held."""
        self._reserved -= asked
        self._claims_in_flight -= 1

    @property
    def claims_in_flight(self) -> int:
        return self._claims_in_flight

    def close(self) -> None:
        """No more claims: the worker is stopping."""
        self.closed = True
        self.changed.set()

    def idle(self) -> bool:
        """Nothing held and no claim in flight."""
        return not self.held and not self._claims_in_flight

    def started(self) -> list[tuple[int, int]]:
        """Every attempt this worker started whose row may still be running in its name."""
        return [(job.id, job.attempt) for job in self.held.values()] + list(self._abandoned)

    # Handlers ----------------------------------------------------------------------------

    def hold(self, job: ClaimedJob) -> None:
        self.held[job.id] = job

    def run(self, job: ClaimedJob, handler: Coroutine[Any, Any, None]) -> None:
        """Hold the job and run its handler; the handler calls ``finished`` when it ends."""
        self.hold(job)
        self._running[job.id] = asyncio.create_task(handler)

    def finished(self, job_id: int) -> None:
        self._running.pop(job_id, None)

    def is_running(self, job_id: int) -> bool:
        return job_id in self._running

    def running(self) -> dict[int, asyncio.Task[None]]:
        return dict(self._running)

    def stop_reason(self, job_id: int) -> StopReason | None:
        return self._stopping.get(job_id)

    def stop(self, job_ids: list[int], reason: StopReason) -> None:
        """Cancel these handlers, remembering why so that each ends in the right outcome. A
        lease that is lapsing overrides any other reason: the job must not be written as
        anything but abandoned to the rescuer."""
        for job_id in job_ids:
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
        self._abandoned.update((outcome.job_id, outcome.attempt) for outcome in abandoned)
        metrics.SLOTS_IN_USE.set(len(self.held))
        self.written += len(done)
        self.changed.set()
