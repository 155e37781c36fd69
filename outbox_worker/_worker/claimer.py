"""Claims jobs for free slots and for the jobs waiting ahead of them, never more than the
slots allow: on its own (the producer) or in the statement that writes a batch of successes
(the completer).

Each claim reserves its rows in the worker's Slots first, so claims may overlap without ever
exceeding the limits. With short jobs, the slots run the jobs claimed ahead while the
successes of those before and their replacements travel to the database in one statement,
so the event loop and the database work at the same time instead of in turn.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import asyncpg
import structlog

from outbox_worker import sql
from outbox_worker._worker.claims import ClaimedJob
from outbox_worker._worker.outcomes import Succeeded
from outbox_worker._worker.slots import NOTHING, Reservation, Slots


class Claimer:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        worker_id: str,
        queues: Sequence[str],
        lease_seconds: float,
        slots: Slots,
        start: Callable[[ClaimedJob], None],
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        """``start`` is handed each job claimed, to be held by it (Slots.offer), once the
        claim's reservation has ended."""
        self._pool = pool
        self._worker_id = worker_id
        self._queues = list(queues)
        self._lease_seconds = lease_seconds
        self._slots = slots
        self._start = start
        self._log = log
        # A claim was lost after it was sent: it may have committed without its answer
        # reaching us, leaving rows claimed under our name that we never started. The next
        # claim that runs alone hands them back first.
        self._orphans_suspected = False
        # The worker's queues with a concurrency limit (QueueWatch keeps this current): each
        # is claimed on its own, through JOB_CLAIM_LIMITED.
        self.limited: frozenset[str] = frozenset()
        self._turn = 0  # the limited queue the last batch of successes claimed for
        # Set while a served queue has a rate limit: how soon to claim again after a claim
        # that found less than it asked for (QueueWatch keeps it current).
        self.retry_within: float | None = None
        # The limited queues one of this worker's claims is in flight for. The producer and
        # the completer never both claim one of them at once: the second claim would only
        # wait on the queue's row, which the first holds locked until it commits, keeping a
        # connection and, on the completer's side, a batch of successes waiting with it.
        # The producer leaves such a queue out (the claim in flight asked for every free
        # slot, and the write after it wakes the producer again); the completer writes its
        # successes alone, or rides a claim on another limited queue.
        self._claiming: set[str] = set()

    async def claim(self) -> tuple[int, int]:
        """Claim on a connection of its own, for each limited queue and then for the
        others: (rows asked for, jobs claimed)."""
        asked = claimed = 0
        for queue in sorted(self.limited):
            if queue in self._claiming:
                continue
            reservation = self._reserve(freed=0)
            if not reservation:
                break
            with self._in_flight(queue):
                more, took = await self._claim(
                    sql.JOB_CLAIM_LIMITED,
                    reservation,
                    queue=queue,
                    limit=reservation.asked,
                    ahead=reservation.ahead,
                )
            asked, claimed = asked + more, claimed + took
        # The others: none when every queue is limited (JOB_CLAIM passes over limited
        # queues, so asking it would cost a round trip for nothing).
        others = [queue for queue in self._queues if queue not in self.limited]
        reservation = self._reserve(freed=0) if others else NOTHING
        if reservation:
            more, took = await self._claim(
                sql.JOB_CLAIM,
                reservation,
                queues=others,
                limit=reservation.asked,
                ahead=reservation.ahead,
            )
            asked, claimed = asked + more, claimed + took
        return asked, claimed

    async def _claim(
        self, statement: str, reservation: Reservation, **params: Any
    ) -> tuple[int, int]:
        try:
            async with self._pool.acquire(timeout=30) as conn:
                rows, sent = await self._send(conn, statement, params)
        finally:
            self._settle(reservation)
        return reservation.asked, self._take(rows, sent)

    async def complete_and_claim(
        self, outcomes: Sequence[Succeeded], *, answer_within: float | None = None
    ) -> list[asyncpg.Record]:
        """Write successes and, in the same statement, claim jobs for the slots they free
        (plus any free already): of the queues without limits, or, when every queue the
        worker serves is limited, of one of them in turn. A worker serving both kinds
        claims apart, the limited queues first, so that the others never take every slot
        their successes free. Returns the rows of the successes written.
        ``answer_within``: cancel the statement (TimeoutError) if it takes longer, waiting
        on a locked row say."""
        statement, claim = self._riding_claim()
        reservation = self._reserve(freed=len(outcomes)) if statement else NOTHING
        done: dict[str, list[Any]] = {
            "ids": [o.job_id for o in outcomes],
            "attempts": [o.attempt for o in outcomes],
            "results": [o.result for o in outcomes],
        }
        if not reservation:
            async with self._pool.acquire(timeout=30) as conn:
                written: list[asyncpg.Record] = await conn.fetch(
                    *sql.bind(sql.JOB_COMPLETE_MANY, **done, worker_id=self._worker_id),
                    timeout=answer_within,
                )
            return written
        try:
            with self._in_flight(claim.get("queue")):
                async with self._pool.acquire(timeout=30) as conn:
                    rows, sent = await self._send(
                        conn,
                        statement,
                        {**claim, "limit": reservation.asked, "ahead": reservation.ahead, **done},
                        answer_within=answer_within,
                    )
        finally:
            self._settle(reservation)
        self._take([row for row in rows if row["claimed"]], sent)
        return [row for row in rows if not row["claimed"]]

    def _riding_claim(self) -> tuple[str, dict[str, Any]]:
        """The claim that may ride on a batch of successes, and its queue parameter; none
        for a worker serving limited queues and others, nor while each of its limited queues
        has a claim in flight."""
        if not self.limited:
            return sql.JOB_COMPLETE_AND_CLAIM, {"queues": self._queues}
        if not self.limited.issuperset(self._queues):
            return "", {}
        limited = sorted(self.limited)
        for _ in limited:
            self._turn = (self._turn + 1) % len(limited)
            if limited[self._turn] not in self._claiming:
                return sql.JOB_COMPLETE_AND_CLAIM_LIMITED, {"queue": limited[self._turn]}
        return "", {}

    @contextlib.contextmanager
    def _in_flight(self, queue: str | None) -> Iterator[None]:
        """Mark a limited queue's claim in flight (none for a claim of unlimited queues)."""
        if queue is None:
            yield
            return
        self._claiming.add(queue)
        try:
            yield
        finally:
            self._claiming.discard(queue)

    def _reserve(self, *, freed: int) -> Reservation:
        """Rows for one claim; ``freed`` are held rows the same statement gives back."""
        if self._orphans_suspected and self._slots.claims_in_flight:
            return NOTHING
        return self._slots.reserve(freed=freed)

    def _settle(self, reservation: Reservation) -> None:
        self._slots.settle(reservation)
        if self._orphans_suspected and not self._slots.claims_in_flight:
            self._slots.changed.set()  # the producer may now claim alone, and hand them back

    async def _send(
        self,
        conn: asyncpg.Connection,
        statement: str,
        params: dict[str, Any],
        *,
        answer_within: float | None = None,
    ) -> tuple[list[asyncpg.Record], float]:
        """The rows of the claim ``statement`` (``params`` but the worker's id and lease,
        with the successes it writes too for JOB_COMPLETE_AND_CLAIM), and when it was sent
        (time.monotonic())."""
        if self._orphans_suspected and self._slots.claims_in_flight == 1:
            started = self._slots.started()
            orphans = await conn.fetch(
                *sql.bind(
                    sql.JOB_RELEASE_ORPHANS,
                    worker_id=self._worker_id,
                    ids=[job_id for job_id, _ in started],
                    attempts=[attempt for _, attempt in started],
                )
            )
            if orphans:
                self._log.warning("orphans_released", jobs=[row["id"] for row in orphans])
            self._orphans_suspected = False
        sent = time.monotonic()
        try:
            rows: list[asyncpg.Record] = await conn.fetch(
                *sql.bind(
                    statement,
                    worker_id=self._worker_id,
                    lease_seconds=self._lease_seconds,
                    **params,
                ),
                timeout=answer_within,
            )
        except BaseException as exc:
            self._orphans_suspected = self._orphans_suspected or _outcome_unknown(exc)
            raise
        took = time.monotonic() - sent
        self._slots.trip(took)
        if took > self._lease_seconds / 2:
            # The answer took longer than half a lease (a stalled process, a paused VM): the
            # leases may have lapsed and the jobs run elsewhere by now. Hand the claimed ones
            # back unstarted; the fence makes that a no-op where it is so.
            late = [row for row in rows if row.get("claimed", True)]
            if late:
                await conn.fetch(
                    *sql.bind(
                        sql.JOB_UNCLAIM_MANY,
                        ids=[row["id"] for row in late],
                        attempts=[row["attempts"] for row in late],
                        worker_id=self._worker_id,
                    )
                )
                self._log.warning("claim_too_late", jobs=[row["id"] for row in late])
                return [row for row in rows if not row.get("claimed", True)], sent
        return rows, sent

    def _take(self, rows: list[asyncpg.Record], leased_at: float) -> int:
        for row in rows:
            self._start(ClaimedJob.of(row, leased_at))
        return len(rows)


def _outcome_unknown(exc: BaseException) -> bool:
    """Whether a statement that raised this may still have committed. An error the server
    answered with (but for a broken connection) means it rolled back; a lost connection, a
    timeout or a cancellation leaves it unknown."""
    if isinstance(exc, asyncpg.PostgresError):
        return isinstance(exc, asyncpg.PostgresConnectionError)
    return True
