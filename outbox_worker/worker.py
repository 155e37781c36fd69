"""The worker: claims due jobs for its free slots and runs them, until told to stop.

Services, each with one job, run side by side in one TaskGroup: the producer loop (here),
the completer, the heartbeat, the rescuer, the pruner and the notifier. Stopping reverses
the start: stop claiming, let in-flight jobs finish within the drain timeout, release the
rest for an immediate retry elsewhere, write every outcome, close.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import asyncpg
import structlog

from outbox_worker import db, metrics, sql
from outbox_worker.backoff import retry_delay
from outbox_worker.claimer import Claimer
from outbox_worker.completer import Completer
from outbox_worker.executor import Executor, describe_error
from outbox_worker.heartbeat import Heartbeat, LoopWatchdog
from outbox_worker.maintenance import Pruner, Rescuer
from outbox_worker.notifier import Notifier
from outbox_worker.outcomes import ClaimedJob, Failed, Outcome
from outbox_worker.registry import Registry


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """Plain values for one worker; entry points build them from WorkerSettings."""

    dsn: str
    queues: tuple[str, ...] = ()
    concurrency: int = 10
    lease_seconds: float = 30.0
    poll_interval: float = 1.0
    drain_timeout: float = 30.0
    listen: bool = True
    listen_dsn: str | None = None
    burst: bool = False
    pool_size: int = 10
    prepared_statements: bool = True
    retry_base: float = 1.0
    retry_cap: float = 3600.0
    retention: dict[str, timedelta | None] = field(default_factory=dict)
    prune_interval: float = 60.0
    metrics_interval: float = 15.0


# Producer (claims), completer, heartbeat, rescuer, pruner and gauges: one connection each.
SERVICE_POOL_SIZE = 6


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    def __init__(
        self, registry: Registry, options: WorkerOptions, *, worker_id: str | None = None
    ) -> None:
        self.registry = registry
        self.options = options
        self.worker_id = worker_id or new_worker_id()
        self.queues = list(options.queues or registry.queues())
        self.log = structlog.get_logger("outbox_worker").bind(worker_id=self.worker_id)
        self.ready = asyncio.Event()
        self.processed = 0
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._running: dict[int, asyncio.Task[None]] = {}
        # Claimed rows whose outcome is not written yet, running or not: the slots in use.
        self._held: dict[int, ClaimedJob] = {}
        # Jobs an operator asked to cancel while they ran (seen by the heartbeat).
        self._cancelling: set[int] = set()
        self._claimer: Claimer | None = None
        self._executor: Executor | None = None
        self._completer: Completer | None = None

    def stop(self) -> None:
        """Stop claiming and drain; safe to call from a signal handler, more than once."""
        if not self._stop.is_set():
            self.log.info("worker_stopping", in_flight=len(self._held))
        if self._claimer is not None:
            self._claimer.closed = True
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def in_flight(self) -> list[tuple[int, int]]:
        return [(job.id, job.attempt) for job in list(self._held.values())]

    def held(self, job_id: int) -> ClaimedJob | None:
        return self._held.get(job_id)

    def is_cancelling(self, job_id: int) -> bool:
        return job_id in self._cancelling

    def cancel_requested(self, job_ids: list[int]) -> None:
        """Stop the handlers of these jobs; each ends as cancelled (see Executor.run)."""
        for job_id in job_ids:
            task = self._running.get(job_id)
            if task is not None and job_id not in self._cancelling:
                self._cancelling.add(job_id)
                self.log.info("job_cancel_requested", job_id=job_id)
                task.cancel()

    async def run(self) -> None:
        opts = self.options
        # The worker's own statements get a pool of their own, so handlers holding
        # connections in ctx.transaction() can never starve the heartbeat or the completer.
        pool = await db.create_pool(
            opts.dsn,
            size=SERVICE_POOL_SIZE,
            prepared_statements=opts.prepared_statements,
            session_state=False,
        )
        handler_pool = await db.create_pool(
            opts.dsn, size=opts.pool_size, prepared_statements=opts.prepared_statements
        )
        claimer = Claimer(
            pool=pool,
            worker_id=self.worker_id,
            queues=self.queues,
            concurrency=opts.concurrency,
            lease_seconds=opts.lease_seconds,
            held=self._held,
            start=self._start,
            wake=self.wake,
            log=self.log,
        )
        completer = Completer(
            pool=pool,
            worker_id=self.worker_id,
            on_written=self._written,
            describe=self.held,
            complete=claimer.complete_and_claim,
            log=self.log,
        )
        executor = Executor(
            registry=self.registry,
            worker_id=self.worker_id,
            pool=handler_pool,
            retry_delay=functools.partial(retry_delay, base=opts.retry_base, cap=opts.retry_cap),
            is_cancelling=self.is_cancelling,
            log=self.log,
        )
        # The heartbeat outlives the stop request: jobs finishing during the drain still
        # need their leases, or another worker would rescue and run them a second time.
        drained = asyncio.Event()
        heartbeat = Heartbeat(
            pool=pool,
            worker_id=self.worker_id,
            queues=self.queues,
            concurrency=opts.concurrency,
            lease_seconds=opts.lease_seconds,
            in_flight=self.in_flight,
            on_cancel_requested=self.cancel_requested,
            stop=drained,
            log=self.log,
        )
        watchdog = LoopWatchdog(
            loop=asyncio.get_running_loop(),
            threshold=heartbeat.interval,
            in_flight=self.in_flight,
            log=self.log,
        )
        self._claimer, self._executor, self._completer = claimer, executor, completer
        services: list[asyncio.Task[None]] = []
        self.log.info(
            "worker_starting", queues=self.queues, concurrency=opts.concurrency, burst=opts.burst
        )
        try:
            async with asyncio.TaskGroup() as group:
                services.append(group.create_task(completer.run(), name="completer"))
                services.append(group.create_task(heartbeat.run(), name="heartbeat"))
                rescuer = Rescuer(
                    pool=pool,
                    interval=max(0.5, opts.lease_seconds / 2),
                    stop=self._stop,
                    log=self.log,
                )
                services.append(group.create_task(rescuer.run(), name="rescuer"))
                if any(keep is not None for keep in opts.retention.values()):
                    pruner = Pruner(
                        pool=pool,
                        retention=opts.retention,
                        interval=opts.prune_interval,
                        stop=self._stop,
                        log=self.log,
                    )
                    services.append(group.create_task(pruner.run(), name="pruner"))
                if opts.listen:
                    notifier = Notifier(
                        dsn=opts.listen_dsn or opts.dsn,
                        wake=self.wake,
                        stop=self._stop,
                        keepalive_seconds=max(1.0, opts.poll_interval * 5),
                        log=self.log,
                    )
                    services.append(group.create_task(notifier.run(), name="notifier"))
                services.append(group.create_task(self._gauges(pool), name="gauges"))
                watchdog.start()
                metrics.SLOTS_TOTAL.set(opts.concurrency)
                # Jobs a crashed predecessor left behind are due now, not after a poll.
                await rescuer.rescue_once()
                await heartbeat.beat()
                self.ready.set()
                self.log.info("worker_ready")
                await self._produce(claimer)
                completer.give_up_after = max(opts.drain_timeout, 1.0)
                await self._drain()
                self._stop.set()
                drained.set()
                for service in services:
                    service.cancel()
                await heartbeat.goodbye()
        finally:
            watchdog.stop()
            await pool.close()
            await handler_pool.close()
            self.log.info("worker_stopped", processed=self.processed)

    async def _produce(self, claimer: Claimer) -> None:
        """Claim whenever slots are free and work may be due: at start, on a notification,
        after a write that freed slots without refilling them, and every poll interval."""
        opts = self.options
        if self._stop.is_set():
            claimer.closed = True
        while not self._stop.is_set():
            self._wake.clear()
            try:
                asked, started = await db.retrying("claim", claimer.claim, until=self._stop)
            except Exception:
                if self._stop.is_set():
                    return
                raise
            if asked and started == asked:
                continue  # more may be due: claim again while slots are free
            if opts.burst and asked and not started and claimer.idle():
                self.log.info("burst_done")
                return
            if opts.burst and not claimer.idle():
                await self._wake.wait()  # a finishing job may have enqueued more work
            else:
                await db.sleep_or_stop(self._wake, opts.poll_interval)

    def _start(self, job: ClaimedJob) -> None:
        assert self._executor is not None
        assert self._completer is not None
        self._held[job.id] = job
        self._running[job.id] = asyncio.create_task(
            self._execute(job, self._executor, self._completer)
        )

    async def _execute(self, job: ClaimedJob, executor: Executor, completer: Completer) -> None:
        try:
            outcome: Outcome = await executor.run(job)
        except Exception as exc:
            # Executor.run catches what handlers raise; this is the worker's own failure on
            # this job, which must still end in an outcome or the slot and lease are held
            # forever.
            self.log.exception("job_not_run", job_id=job.id)
            outcome = Failed(
                job.id, job.attempt, f"worker error: {describe_error(exc)}", self.options.retry_base
            )
        finally:
            self._running.pop(job.id, None)
        completer.put(outcome)

    def _written(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            job = self._held.get(outcome.job_id)
            if job is not None and job.attempt == outcome.attempt:
                del self._held[outcome.job_id]
                self._cancelling.discard(outcome.job_id)
        metrics.SLOTS_IN_USE.set(len(self._held))
        self.processed += len(outcomes)
        self._wake.set()

    async def _drain(self) -> None:
        """Give in-flight jobs the drain timeout, release the rest, wait for every outcome."""
        opts = self.options
        running = list(self._running.values())
        if running:
            self.log.info("draining", jobs=len(running), timeout=opts.drain_timeout)
            _, pending = await asyncio.wait(running, timeout=opts.drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        # The completer writes what is left (it gives up after the drain timeout when the
        # database is gone: the leases then expire and another worker's rescuer takes over).
        while self._held:
            self._wake.clear()
            await self._wake.wait()

    async def _gauges(self, pool: asyncpg.Pool) -> None:
        """Queue depth and oldest-due gauges for --metrics-port, from one cheap query."""
        while True:
            try:
                rows = await db.fetch(pool, "gauges", sql.QUEUE_ACTIVE_STATS, give_up_after=5.0)
                metrics.refresh_queue_gauges(rows)
                alive = await db.fetch(
                    pool,
                    "gauges",
                    sql.WORKERS_ALIVE_PG,
                    self.options.lease_seconds * 2,
                    give_up_after=5.0,
                )
                metrics.WORKERS_ALIVE.set(len(alive))
            except Exception as exc:
                if not db.is_transient(exc):
                    raise
            metrics.SLOTS_IN_USE.set(len(self._held))
            await asyncio.sleep(self.options.metrics_interval)
