"""drain and DrainResult: due jobs run in the test's process through the worker's own claim,
Executor and fenced outcome statements, so a test sees what a worker would do."""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
import structlog

from outbox_worker import db, sql
from outbox_worker._worker.backoff import retry_delay
from outbox_worker._worker.claims import ClaimedJob
from outbox_worker._worker.completer import outcome_statement
from outbox_worker._worker.executor import Executor
from outbox_worker._worker.maintenance import ReadyLanes
from outbox_worker._worker.offload import offload_for_one
from outbox_worker._worker.outcomes import Cancelled, Failed, Outcome, Settled, Snoozed, Succeeded
from outbox_worker.config import WorkerSettings, asyncpg_dsn
from outbox_worker.jobs import JobState
from outbox_worker.registry import Registry
from outbox_worker.worker import new_worker_id

# No heartbeat extends a drain's leases, so each is long enough for any handler a test runs.
# Should the test process die mid-drain, a worker's rescuer takes the job back once it lapses.
DRAIN_LEASE_SECONDS = 600.0

# Where JOB_FAIL_MANY and JOB_SNOOZE_MANY leave a job (its state) → the DrainResult field
# that counts it.
_FAILED_ENDS = {"queued": "retried", "dead": "dead", "cancelled": "cancelled"}
_SNOOZED_ENDS = {"queued": "snoozed", "dead": "dead", "cancelled": "cancelled"}


@dataclass(frozen=True, slots=True)
class DrainResult:
    """How each attempt a drain ran ended, and the jobs it ran, in order (a job twice if its
    retry fell due during the drain)."""

    succeeded: int = 0
    # Failed, with attempts left: queued again after its backoff.
    retried: int = 0
    # Failed its last attempt, or could never run (unknown task, args that do not fit).
    dead: int = 0
    # Cancelled by its handler (CancelJob), or failed after an operator asked to cancel it.
    cancelled: int = 0
    # Snoozed by its handler (SnoozeJob): queued again, the attempt given back.
    snoozed: int = 0
    # Its outcome was not written: the row was no longer the drain's (the worker's fence).
    lost: int = 0
    job_ids: tuple[int, ...] = ()

    @property
    def ran(self) -> int:
        return len(self.job_ids)


async def drain(
    registry: Registry,
    database: str | asyncpg.Pool,
    *,
    queues: Iterable[str] | None = None,
    limit: int | None = None,
) -> DrainResult:
    """Run every due job of ``queues`` (by default the registry's, as ``outbox-worker run``
    serves) in this process, one at a time in the order a worker claims them, until none is
    due; at most ``limit`` attempts when given.

    Each job is claimed, run and written as a worker would: the worker's claim, its Executor
    (timeouts, ``ctx.transaction()``, unknown tasks and misfit args go dead), and its fenced
    outcome statements. A plain ``def`` handler runs in a thread, and a ``run_in="process"``
    one in a child process, started for the first such job and stopped at the end. A failed
    attempt is queued again after the worker's backoff (OUTBOX_RETRY_BASE_SECONDS: half a
    second to a second after a first failure, by default), so it is not due yet and the
    drain ends rather than retry it at once. Jobs the drained jobs enqueue (and commit) are
    due too, and drained in the same call: ``limit`` bounds a chain that keeps enqueueing.

    ``database`` is the app's database URL (a pool is opened and closed here) or an asyncpg
    pool. The drain sees committed jobs only: commit (or finish the request) first.
    """
    if isinstance(queues, str):
        raise TypeError(f"queues is a list of names, e.g. queues=[{queues!r}]")
    if limit is not None and limit < 0:
        raise ValueError("limit must be 0 or more")
    served = list(registry.queues() if queues is None else queues)
    settings = WorkerSettings()
    worker_id = new_worker_id("drain")
    log = structlog.get_logger("outbox_worker").bind(worker_id=worker_id)
    async with _pool(database) as pool, offload_for_one(log) as offload:
        executor = Executor(
            registry=registry,
            worker_id=worker_id,
            pool=pool,
            retry_delay=functools.partial(
                retry_delay, base=settings.retry_base_seconds, cap=settings.retry_cap_seconds
            ),
            # Nothing stops a drained handler: no operator cancel is heard (there is no
            # heartbeat), and the drain has no shutdown of its own.
            stop_reason=lambda job_id: None,
            log=log,
            offload=offload,
        )
        # Jobs that came due while no worker ran are still waiting outside the ready lanes
        # the claim reads: bring them in, as a worker does when it starts.
        await ReadyLanes(pool=pool, log=structlog.get_logger("outbox_worker")).maintain_once()
        ends: collections.Counter[str] = collections.Counter()
        ran: list[int] = []
        while limit is None or len(ran) < limit:
            claimed = await _claim_one(pool, served, worker_id)
            if not claimed:
                break
            row = claimed[0]
            job = ClaimedJob.of(row)
            # A task of its own, as the worker runs each job: the correlation id and log
            # fields the Executor binds stay out of the caller's context.
            outcome = await asyncio.create_task(executor.run(job))
            ends[await _write(pool, worker_id, outcome)] += 1
            ran.append(job.id)
    return DrainResult(
        succeeded=ends["succeeded"],
        retried=ends["retried"],
        dead=ends["dead"],
        cancelled=ends["cancelled"],
        snoozed=ends["snoozed"],
        lost=ends["lost"],
        job_ids=tuple(ran),
    )


@asynccontextmanager
async def _pool(database: str | asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    if not isinstance(database, str):
        yield database
        return
    pool = await db.create_pool(asyncpg_dsn(database), size=4, prepared_statements=True)
    try:
        yield pool
    finally:
        await pool.close()


async def _write(pool: asyncpg.Pool, worker_id: str, outcome: Outcome) -> str:
    """Write one outcome with the statement the worker's Completer uses for it; returns the
    DrainResult field it counts in."""
    if isinstance(outcome, Settled):
        # Completed in its own transaction (ctx.transaction()), or its lease was lost: the
        # row says which.
        row = await pool.fetchrow(*sql.bind(sql.JOB_GET_PG, id=outcome.job_id))
        finished = row is not None and row["state"] == JobState.SUCCEEDED
        return "succeeded" if finished else "lost"
    if not isinstance(outcome, Succeeded | Failed | Cancelled | Snoozed):
        raise AssertionError(f"a drain never stops a handler, yet its attempt ended as {outcome}")
    written = await pool.fetch(*outcome_statement([outcome], worker_id))
    if not written:
        return "lost"
    if isinstance(outcome, Failed):
        return _FAILED_ENDS[written[0]["state"]]
    if isinstance(outcome, Snoozed):
        return _SNOOZED_ENDS[written[0]["state"]]
    return "succeeded" if isinstance(outcome, Succeeded) else "cancelled"


async def _claim_one(pool: asyncpg.Pool, served: list[str], worker_id: str) -> list[asyncpg.Record]:
    """One due job, as a worker claims it: from the queues without limits in claim order,
    else from each queue with limits (a paused queue gives none)."""
    claimed: list[asyncpg.Record] = await pool.fetch(
        *sql.bind(
            sql.JOB_CLAIM,
            queues=served,
            limit=1,
            ahead=0,
            worker_id=worker_id,
            lease_seconds=DRAIN_LEASE_SECONDS,
        )
    )
    for queue in served:
        if claimed:
            break
        claimed = await pool.fetch(
            *sql.bind(
                sql.JOB_CLAIM_LIMITED,
                queue=queue,
                limit=1,
                ahead=0,
                worker_id=worker_id,
                lease_seconds=DRAIN_LEASE_SECONDS,
            )
        )
    return claimed
