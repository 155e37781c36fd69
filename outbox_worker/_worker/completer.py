"""Writes outcomes in batches: one fenced statement per kind per flush, not one per job.

While a flush runs, new outcomes queue up and go out together in the next one, so batches
grow with load and an idle worker still writes each outcome at once. A flush that fails on a
transient error keeps its items and is retried. A batch the database refuses outright (a
value it cannot store, a constraint) is written again one outcome at a time, so that one
bad outcome costs only its own job: each one that is refused alone is written in a plainer
form (a success without its result, a failure with its error in ASCII), and only when even
that is refused is it abandoned to the rescuer. An outcome is dropped unwritten only when
the fence says the job is no longer ours.

A write that waits too long (a row locked by another session, an operator's SELECT … FOR
UPDATE in psql) is cancelled and its batch written one outcome at a time; the outcome that
still waits is set aside and retried alone, apart from the batches, so that one locked row
holds up only its own job.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg
import structlog
from prometheus_client import Counter

from outbox_worker import db, metrics, sql
from outbox_worker._worker.outcomes import (
    Abandoned,
    Cancelled,
    Failed,
    Outcome,
    Released,
    Settled,
    Snoozed,
    Succeeded,
    Unclaimed,
)
from outbox_worker._worker.slots import Slots
from outbox_worker.formatting import error_line

T = TypeVar("T")

_COUNTERS = {
    "succeeded": metrics.SUCCEEDED,
    "failed": metrics.RETRIED,
    "cancelled": metrics.CANCELLED,
    "snoozed": metrics.SNOOZED,
}


# How often outcomes set aside because their write waited too long are tried again.
SET_ASIDE_RETRY_SECONDS = 0.5


class _Stalled(Exception):
    """A write waited longer than the completer allows, and was cancelled."""


class Completer:
    name = "completer"

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        worker_id: str,
        slots: Slots,
        complete: Callable[..., Awaitable[list[asyncpg.Record]]],
        give_up: asyncio.Event,
        stall_after: float,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        """``slots`` hears of every outcome once (Slots.release): done when written or no
        longer ours, abandoned when it could not be written. ``complete(successes,
        answer_within=…)`` writes successes. ``give_up`` ends the retrying of transient errors (a
        shutdown whose database is gone). A write that waits ``stall_after`` seconds is
        cancelled (see the module's docstring)."""
        self._pool = pool
        self._worker_id = worker_id
        self._slots = slots
        self._complete = complete
        self._give_up = give_up
        self._stall_after = stall_after
        self._log = log
        self._queue: asyncio.Queue[Outcome] = asyncio.Queue()
        self._set_aside: dict[tuple[int, int], Outcome] = {}

    def put(self, outcome: Outcome) -> None:
        self._queue.put_nowait(outcome)

    async def run(self) -> None:
        """Flush until cancelled; outcomes set aside are retried beside the batches."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._retry_set_aside())
            while True:
                batch = [await self._queue.get()]
                while not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                await self._write(batch)

    async def _retry_set_aside(self) -> None:
        while True:
            await asyncio.sleep(SET_ASIDE_RETRY_SECONDS)
            waiting = list(self._set_aside.values())
            done: list[Outcome] = []
            abandoned: list[Outcome] = []
            for outcome in waiting:
                await self._write_alone(_kind(outcome), outcome, done, abandoned)
            for outcome in [*done, *abandoned]:
                self._set_aside.pop((outcome.job_id, outcome.attempt), None)
            if done or abandoned:
                self._slots.release(done, abandoned)

    async def _unstalled(self, write: Callable[[], Awaitable[T]]) -> T:
        try:
            return await write()
        except TimeoutError as exc:
            raise _Stalled(f"no answer within {self._stall_after:g}s") from exc

    async def _write(self, batch: list[Outcome]) -> None:
        done: list[Outcome] = []
        abandoned: list[Outcome] = []
        # One fenced statement per kind. Successes go last, so that the claim riding on
        # their statement (see Claimer) finds every slot of this batch free.
        for what, kind in _KINDS:
            outcomes = [o for o in batch if isinstance(o, kind)]
            if outcomes:
                await self._write_kind(what, outcomes, done, abandoned)
        for outcome in batch:
            if isinstance(outcome, Settled):
                done.append(outcome)
            elif isinstance(outcome, Abandoned):
                abandoned.append(outcome)
        self._slots.release(done, abandoned)

    async def _write_kind(
        self,
        what: str,
        outcomes: Sequence[Outcome],
        done: list[Outcome],
        abandoned: list[Outcome],
    ) -> None:
        unit: Callable[[], Awaitable[list[asyncpg.Record]]]
        if what == "succeeded":
            succeeded = [o for o in outcomes if isinstance(o, Succeeded)]
            unit = functools.partial(self._complete, succeeded, answer_within=self._stall_after)
        else:
            unit = functools.partial(self._send, outcomes)
        try:
            rows = await db.retrying(
                what, functools.partial(self._unstalled, unit), until=self._give_up
            )
        except _Stalled as exc:
            self._log.warning(
                "outcome_batch_stalled",
                outcome=what,
                jobs=[o.job_id for o in outcomes],
                error=str(exc),
                hint="a row of the batch is probably locked by another session",
            )
            for outcome in outcomes:
                await self._write_alone(what, outcome, done, abandoned)
            return
        except Exception as exc:
            if db.is_transient(exc):
                # Only reachable once told to give up (shutdown with the database gone):
                # the leases will expire and the rescuer of another worker takes the jobs.
                self._log.error(
                    "outcomes_not_written",
                    jobs=[o.job_id for o in outcomes],
                    error=error_line(exc),
                )
                abandoned.extend(outcomes)
                return
            self._log.warning(
                "outcome_batch_refused",
                outcome=what,
                jobs=[o.job_id for o in outcomes],
                error=error_line(exc),
            )
            for outcome in outcomes:
                await self._write_alone(what, outcome, done, abandoned)
            return
        self._report_fenced(outcomes, rows, what)
        self._count(what, rows)
        done.extend(outcomes)

    async def _write_alone(
        self, what: str, outcome: Outcome, done: list[Outcome], abandoned: list[Outcome]
    ) -> None:
        """One outcome on its own, then in its plainer form; abandoned if both are refused."""
        refusal: Exception | None = None
        for form in _forms(outcome):
            try:
                rows = await db.retrying(
                    what,
                    functools.partial(self._unstalled, functools.partial(self._send, [form])),
                    until=self._give_up,
                )
            except _Stalled:
                self._set_aside_once(what, outcome)
                return
            except Exception as exc:
                refusal = exc
                if db.is_transient(exc):
                    break  # only once told to give up: no plainer form will fare better
                continue
            if form is not outcome:
                self._log.error(
                    "outcome_written_plainer",
                    job_id=outcome.job_id,
                    attempt=outcome.attempt,
                    outcome=what,
                    refused=f"{type(refusal).__name__}: {refusal}",
                )
            self._report_fenced([form], rows, what)
            self._count(what, rows)
            done.append(outcome)
            return
        self._log.error(
            "outcome_not_written",
            job_id=outcome.job_id,
            attempt=outcome.attempt,
            outcome=what,
            error=f"{type(refusal).__name__}: {refusal}",
            hint="the job stays running until its lease lapses; then a rescuer takes it back",
        )
        abandoned.append(outcome)

    def _set_aside_once(self, what: str, outcome: Outcome) -> None:
        key = (outcome.job_id, outcome.attempt)
        if key not in self._set_aside:
            self._set_aside[key] = outcome
            self._log.warning(
                "outcome_set_aside",
                job_id=outcome.job_id,
                attempt=outcome.attempt,
                outcome=what,
                hint="its write waits (a row locked by another session?); it is retried "
                "alone while the other outcomes go on",
            )

    async def _send(self, outcomes: Sequence[Outcome]) -> list[asyncpg.Record]:
        """One fenced statement for outcomes of one kind, on a connection of its own."""
        async with self._pool.acquire(timeout=30) as conn:
            rows: list[asyncpg.Record] = await conn.fetch(
                *outcome_statement(outcomes, self._worker_id), timeout=self._stall_after
            )
        return rows

    def _count(self, what: str, rows: list[asyncpg.Record]) -> None:
        """Outcome counters, added up per (task, queue) before touching prometheus; and the
        queues these failures paused."""
        counts: collections.Counter[tuple[Counter, str, str]] = collections.Counter()
        trips: dict[tuple[str, str], int] = {}
        for row in rows:
            job = self._slots.held.get(row["id"])
            task, queue = (job.task, job.queue) if job is not None else ("unknown", "unknown")
            if what == "failed" and row["tripped_task"] is not None:
                trips[queue, row["tripped_task"]] = row["tripped_after"]
            if what in ("failed", "released", "snoozed") and row["state"] == "dead":
                self._log.error("job_dead", job_id=row["id"])
                counts[metrics.DEAD, task, queue] += 1
            elif what in _COUNTERS:
                counts[_COUNTERS[what], task, queue] += 1
        for (counter, task, queue), count in counts.items():
            counter.labels(task, queue).inc(count)
        for (queue, task), failures in trips.items():
            self._log.error(
                "queue_paused_by_breaker",
                queue=queue,
                task=task,
                failures=failures,
                hint="its task failed that many attempts in a row; resume the queue "
                "(outbox-worker queues resume) once the cause is fixed",
            )
            metrics.BREAKER_TRIPS.labels(queue, task).inc()

    def _report_fenced(
        self, outcomes: Sequence[Outcome], rows: list[asyncpg.Record], what: str
    ) -> None:
        if len(rows) == len(outcomes):
            return
        written = {row["id"] for row in rows}
        for outcome in outcomes:
            if outcome.job_id not in written:
                self._log.warning(
                    "outcome_dropped_lease_lost",
                    job_id=outcome.job_id,
                    attempt=outcome.attempt,
                    outcome=what,
                )


# The kinds written by statement, in the order they are written.
_KINDS: tuple[
    tuple[str, type[Failed | Released | Unclaimed | Cancelled | Snoozed | Succeeded]], ...
] = (
    ("failed", Failed),
    ("released", Released),
    ("unclaimed", Unclaimed),
    ("cancelled", Cancelled),
    ("snoozed", Snoozed),
    ("succeeded", Succeeded),
)


# Each kind's fenced statement, and the arrays it takes besides the ids, the attempts and
# the worker id: statement parameter -> the outcome's field.
_WRITES: dict[type[Outcome], tuple[str, dict[str, str]]] = {
    Succeeded: (sql.JOB_COMPLETE_MANY, {"results": "result"}),
    Failed: (sql.JOB_FAIL_MANY, {"errors": "error", "delays": "delay", "give_up": "give_up"}),
    Cancelled: (sql.JOB_CANCEL_MANY, {"reasons": "reason"}),
    Snoozed: (sql.JOB_SNOOZE_MANY, {"delays": "delay", "max_snoozes": "max_snoozes"}),
    Released: (sql.JOB_RELEASE_MANY, {}),
    Unclaimed: (sql.JOB_UNCLAIM_MANY, {}),
}


def outcome_statement(outcomes: Sequence[Outcome], worker_id: str) -> tuple[Any, ...]:
    """The fenced statement that writes ``outcomes`` (all of one kind) and its arguments,
    bound for asyncpg: the worker's and the test drain's one way of writing an outcome."""
    kind = type(outcomes[0])
    if kind not in _WRITES:
        raise TypeError(f"{kind.__name__} has nothing to write")
    statement, fields = _WRITES[kind]
    return sql.bind(
        statement,
        ids=[o.job_id for o in outcomes],
        attempts=[o.attempt for o in outcomes],
        worker_id=worker_id,
        **{param: [getattr(o, field) for o in outcomes] for param, field in fields.items()},
    )


def _kind(outcome: Outcome) -> str:
    return next(what for what, kind in _KINDS if isinstance(outcome, kind))


def _forms(outcome: Outcome) -> list[Outcome]:
    """The outcome, then a plainer form of it the database cannot refuse for its values."""
    if isinstance(outcome, Succeeded) and outcome.result is not None:
        return [outcome, Succeeded(outcome.job_id, outcome.attempt, None)]
    if isinstance(outcome, Failed):
        plain = ascii(outcome.error[:2000])
        return [
            outcome,
            Failed(outcome.job_id, outcome.attempt, plain, outcome.delay, outcome.give_up),
        ]
    return [outcome]
