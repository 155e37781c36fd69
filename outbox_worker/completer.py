"""Writes outcomes in batches: one fenced statement per kind per flush, not one per job.

While a flush runs, new outcomes queue up and go out together in the next one, so batches
grow with load and an idle worker still writes each outcome at once. A flush that fails on a
transient error keeps its items and is retried; an outcome is only dropped when the fence
says the job is no longer ours.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
import structlog
from prometheus_client import Counter

from outbox_worker import db, metrics, sql
from outbox_worker.outcomes import (
    Cancelled,
    ClaimedJob,
    Failed,
    Outcome,
    Released,
    Succeeded,
)

_COUNTERS = {
    "succeeded": metrics.SUCCEEDED,
    "failed": metrics.RETRIED,
    "cancelled": metrics.CANCELLED,
}


class Completer:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        worker_id: str,
        on_written: Callable[[list[Outcome]], None],
        describe: Callable[[int], ClaimedJob | None],
        complete: Callable[[Sequence[Succeeded]], Awaitable[list[asyncpg.Record]]],
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._pool = pool
        self._worker_id = worker_id
        self._on_written = on_written
        self._describe = describe
        self._complete = complete
        self._log = log
        self._queue: asyncio.Queue[Outcome] = asyncio.Queue()
        self.give_up_after: float | None = None

    def put(self, outcome: Outcome) -> None:
        self._queue.put_nowait(outcome)

    async def run(self) -> None:
        """Flush until cancelled; call :meth:`flush_pending` after cancelling to write the rest."""
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._write(batch)

    async def flush_pending(self) -> None:
        batch: list[Outcome] = []
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        if batch:
            await self._write(batch)

    async def _write(self, batch: list[Outcome]) -> None:
        # One fenced statement per kind; each takes (ids, attempts, *columns, worker id).
        # Successes go last, so that the claim riding on their statement (see Claimer) finds
        # every slot of this batch free.
        writes: list[
            tuple[str, str, list[Failed] | list[Released] | list[Cancelled], tuple[str, ...]]
        ] = [
            (
                "failed",
                sql.JOB_FAIL_MANY,
                [o for o in batch if isinstance(o, Failed)],
                ("error", "delay", "give_up"),
            ),
            ("released", sql.JOB_RELEASE_MANY, [o for o in batch if isinstance(o, Released)], ()),
            (
                "cancelled",
                sql.JOB_CANCEL_MANY,
                [o for o in batch if isinstance(o, Cancelled)],
                (),
            ),
        ]
        succeeded = [o for o in batch if isinstance(o, Succeeded)]
        try:
            for what, statement, outcomes, columns in writes:
                if not outcomes:
                    continue
                rows = await db.fetch(
                    self._pool,
                    what,
                    statement,
                    [o.job_id for o in outcomes],
                    [o.attempt for o in outcomes],
                    *([getattr(o, column) for o in outcomes] for column in columns),
                    self._worker_id,
                    give_up_after=self.give_up_after,
                )
                self._report_fenced(outcomes, rows, what)
                self._count(what, rows)
            if succeeded:
                rows = await db.retrying(
                    "succeeded",
                    functools.partial(self._complete, succeeded),
                    give_up_after=self.give_up_after,
                )
                self._report_fenced(succeeded, rows, "succeeded")
                self._count("succeeded", rows)
        except Exception:
            # Only reachable when give_up_after is set (shutdown with the database gone):
            # the leases will expire and the rescuer of another worker takes the jobs back.
            self._log.exception("outcomes_not_written", jobs=[o.job_id for o in batch])
        self._on_written(batch)

    def _count(self, what: str, rows: list[asyncpg.Record]) -> None:
        """Outcome counters, added up per (task, queue) before touching prometheus."""
        counts: collections.Counter[tuple[Counter, str, str]] = collections.Counter()
        for row in rows:
            job = self._describe(row["id"])
            task, queue = (job.task, job.queue) if job is not None else ("unknown", "unknown")
            if what == "failed" and row["state"] == "dead":
                self._log.error("job_dead", job_id=row["id"])
                counts[metrics.DEAD, task, queue] += 1
            elif what in _COUNTERS:
                counts[_COUNTERS[what], task, queue] += 1
        for (counter, task, queue), count in counts.items():
            counter.labels(task, queue).inc(count)

    def _report_fenced(
        self,
        outcomes: list[Succeeded] | list[Failed] | list[Released] | list[Cancelled],
        rows: list[asyncpg.Record],
        what: str,
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
