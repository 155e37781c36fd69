"""The worker: claims due jobs for its free slots and runs them, until told to stop.

Services, each with one job, run side by side in one TaskGroup: the producer loop (here),
the completer, the heartbeat and its lease guard, the rescuer, the pruner and the notifier.
Stopping reverses the start: stop claiming, let in-flight jobs finish within the drain
timeout, release the rest for an immediate retry elsewhere, write every outcome, close. Every
step of the stop is bounded, so SIGTERM ends the worker within the drain timeout plus
STOP_GRACE_SECONDS, whatever its handlers or its database do.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import asyncpg
import structlog

from outbox_worker import db, metrics, migrate, sql
from outbox_worker._worker.backoff import retry_delay
from outbox_worker._worker.claimer import Claimer
from outbox_worker._worker.claims import ClaimedJob
from outbox_worker._worker.completer import Completer
from outbox_worker._worker.executor import Executor, describe_error
from outbox_worker._worker.gauges import Gauges
from outbox_worker._worker.heartbeat import Heartbeat, LoopWatchdog
from outbox_worker._worker.maintenance import Pruner, ReadyLanes, Rescuer
from outbox_worker._worker.notifier import Notifier
from outbox_worker._worker.offload import Offload
from outbox_worker._worker.outcomes import Failed, Outcome
from outbox_worker._worker.queue_watch import QueueWatch
from outbox_worker._worker.scheduler import Scheduler
from outbox_worker._worker.service import Service
from outbox_worker._worker.slots import Slots
from outbox_worker.errors import ConfigError, DatabaseUnavailable
from outbox_worker.registry import Registry


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """Plain values for one worker; entry points build them from WorkerSettings."""

    dsn: str
    queues: tuple[str, ...] = ()
    concurrency: int = 10
    # The most jobs claimed ahead of a free slot, so that a slot whose job ends starts the
    # next one at once (fewer when jobs are long: see _worker/slots.py); None: the
    # concurrency, and at least 256.
    prefetch: int | None = None
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
    # How long start-up waits for a database that does not answer (refused, unknown host,
    # starting up) before it gives up with DatabaseUnavailable.
    startup_timeout: float = 60.0
    # Threads for plain def handlers (None: the concurrency, at most 32), and processes for
    # run_in="process" ones (None: the CPUs, at most the concurrency), started when needed.
    handler_threads: int | None = None
    handler_processes: int | None = None


# Producer (claims), completer, its retry of outcomes set aside, heartbeat, rescuer, pruner
# and gauges: one connection each. The brief once-a-second reads (lanes' upkeep, schedules,
# queue settings) take whichever is free.
SERVICE_POOL_SIZE = 7
# After the drain timeout: how long cancelled handlers get to end, and then how long the
# outcomes get to be written, before the worker stops regardless (an unwritten outcome's
# lease lapses and a rescuer takes the job back).
CANCEL_GRACE_SECONDS = 2.0
STOP_GRACE_SECONDS = 5.0


def new_worker_id(name: str | None = None) -> str:
    """``host:pid:random``, or ``name:random``: unique by construction, because the fence
    and the hand-back of lost claims trust that no other worker ever holds the same id."""
    return f"{name or f'{socket.gethostname()}:{os.getpid()}'}:{secrets.token_hex(6)}"


class Worker:
    def __init__(self, registry: Registry, options: WorkerOptions, *, name: str | None = None):
        """``name`` prefixes the worker's id (default ``host:pid``); a random suffix always
        follows, so two workers given the same name still get different ids."""
        self.registry = registry
        self.options = options
        self.worker_id = new_worker_id(name)
        self.queues = list(options.queues or registry.queues())
        self.log = structlog.get_logger("outbox_worker").bind(worker_id=self.worker_id)
        self.ready = asyncio.Event()
        # Handlers still running when the worker stopped: they ignored their cancellation.
        self.stuck: list[asyncio.Task[None]] = []
        ahead = max(256, options.concurrency) if options.prefetch is None else options.prefetch
        self._slots = Slots(options.concurrency, ahead=ahead, log=self.log)
        self._stop = asyncio.Event()
        self._give_up_writes = asyncio.Event()
        self._offload = Offload(
            threads=options.handler_threads or min(32, options.concurrency),
            processes=options.handler_processes or min(os.cpu_count() or 1, options.concurrency),
            log=self.log,
            linger=self._slots.linger,
        )

    @property
    def processed(self) -> int:
        """Outcomes written so far."""
        return self._slots.written

    def stop(self) -> None:
        """Stop claiming and drain; safe to call from a signal handler, more than once."""
        if not self._stop.is_set():
            self.log.info("worker_stopping", in_flight=len(self._slots.held))
        self._stop.set()
        self._slots.close()

    def wake(self) -> None:
        self._slots.changed.set()

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
        try:
            if await self._check_database(pool):
                try:
                    await self._serve(pool, handler_pool)
                finally:
                    self.log.info("worker_stopped", processed=self.processed)
        finally:
            await self._offload.close()
            await _close_pool(pool)
            await _close_pool(handler_pool)

    async def _check_database(self, pool: asyncpg.Pool) -> bool:
        """Reach the database and find the schema before serving: a wrong URL, password or
        database name, or a missing schema, is a one-line error at start rather than a
        worker that retries for ever. An unreachable server is waited for, up to the
        start-up timeout or a stop. False when stopped while waiting.

        A schema recorded at an older revision than this code's is refused too; one recorded
        nowhere (tables made by hand, or by an application revision that depends on the
        library's) is taken as it is, and one newer than this code (migrated ahead of a
        rolling deploy) is served."""

        async def probe() -> None:
            async with pool.acquire(timeout=opts.startup_timeout) as conn:
                await conn.execute(sql.SCHEMA_PROBE)
                state = await migrate.recorded_state(conn)
            if state.status == "behind":
                raise ConfigError(state.summary(db.where(opts.dsn)))

        opts = self.options
        reached = asyncio.ensure_future(
            db.retrying("startup", probe, give_up_after=opts.startup_timeout)
        )
        stopped = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({reached, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not reached.done():
            reached.cancel()
            with contextlib.suppress(BaseException):
                await reached
            return False
        try:
            reached.result()
        except Exception as exc:
            error = db.database_error(exc, opts.dsn)
            if error is None:
                raise
            if isinstance(error, DatabaseUnavailable) and db.is_transient(exc):
                error = DatabaseUnavailable(f"{error} (waited {opts.startup_timeout:g}s)")
            raise error from exc
        return not self._stop.is_set()

    async def _serve(self, pool: asyncpg.Pool, handler_pool: asyncpg.Pool) -> None:
        opts = self.options
        slots = self._slots
        executor = Executor(
            registry=self.registry,
            worker_id=self.worker_id,
            pool=handler_pool,
            retry_delay=functools.partial(retry_delay, base=opts.retry_base, cap=opts.retry_cap),
            stop_reason=slots.stop_reason,
            log=self.log,
            offload=self._offload,
            report_progress=slots.report_progress,
        )
        claimer = Claimer(
            pool=pool,
            worker_id=self.worker_id,
            queues=self.queues,
            lease_seconds=opts.lease_seconds,
            slots=slots,
            start=slots.offer,
            log=self.log,
        )
        completer = Completer(
            pool=pool,
            worker_id=self.worker_id,
            slots=slots,
            complete=claimer.complete_and_claim,
            give_up=self._give_up_writes,
            # Long past any healthy write, short enough that a locked row stalls the
            # other outcomes but briefly.
            stall_after=max(2.0, opts.lease_seconds / 10),
            log=self.log,
        )
        heartbeat = Heartbeat(
            pool=pool,
            worker_id=self.worker_id,
            queues=self.queues,
            lease_seconds=opts.lease_seconds,
            slots=slots,
            log=self.log,
        )
        slots.attach(
            execute=functools.partial(self._execute, executor=executor, completer=completer),
            put=completer.put,
            fresh=heartbeat.fresh,
        )
        rescuer = Rescuer(pool=pool, interval=max(0.5, opts.lease_seconds / 2), log=self.log)
        lanes = ReadyLanes(pool=pool, log=self.log)
        watch = QueueWatch(
            pool=pool,
            queues=self.queues,
            claimer=claimer,
            slots=slots,
            interval=opts.poll_interval,
            log=self.log,
        )
        # Stopped with the claiming: they only serve claims.
        claiming: list[Service] = [rescuer, lanes, watch]
        if any(keep is not None for keep in opts.retention.values()):
            claiming.append(
                Pruner(
                    pool=pool,
                    retention=opts.retention,
                    interval=opts.prune_interval,
                    log=self.log,
                )
            )
        if self.registry.schedules() and not opts.burst:
            # A burst worker runs what is due and exits: firing schedules would never let
            # the queue run dry, so it leaves them to the long-running workers.
            claiming.append(
                Scheduler(
                    pool=pool,
                    registry=self.registry,
                    interval=opts.poll_interval,
                    log=self.log,
                )
            )
        if opts.listen:
            claiming.append(
                Notifier(
                    dsn=opts.listen_dsn or opts.dsn,
                    pool=pool,
                    wake=self.wake,
                    poll_interval=opts.poll_interval,
                    keepalive_seconds=max(1.0, opts.poll_interval * 5),
                    log=self.log,
                )
            )
        # Stopped once every outcome is written: jobs finishing during the drain still need
        # their leases and their outcomes.
        in_flight: list[Service] = [
            completer,
            heartbeat,
            Gauges(
                pool=pool,
                slots=slots,
                lease_seconds=opts.lease_seconds,
                interval=opts.metrics_interval,
            ),
        ]
        watchdog = LoopWatchdog(
            loop=asyncio.get_running_loop(), threshold=heartbeat.interval, slots=slots, log=self.log
        )
        self.log.info(
            "worker_starting",
            queues=self.queues,
            concurrency=opts.concurrency,
            prefetch=slots.ahead,
            burst=opts.burst,
        )
        try:
            async with asyncio.TaskGroup() as group:
                tasks = {
                    service.name: group.create_task(service.run(), name=service.name)
                    for service in [*in_flight, *claiming]
                }
                watchdog.start()
                metrics.SLOTS_TOTAL.set(opts.concurrency)
                await self._first_round(rescuer, lanes, watch, heartbeat)
                self.ready.set()
                self.log.info("worker_ready")
                await self._produce(claimer)
                _cancel(tasks, claiming)
                await self._drain()
                self._stop.set()
                _cancel(tasks, in_flight)
                await heartbeat.goodbye()
        finally:
            watchdog.stop()

    async def _first_round(
        self, rescuer: Rescuer, lanes: ReadyLanes, watch: QueueWatch, heartbeat: Heartbeat
    ) -> None:
        """Before claiming: make the jobs a crashed predecessor left behind due now, not
        after a rescue interval, bring jobs that came due while no worker ran into the
        lanes the claim reads, learn which queues are limited, and say the worker is alive.
        A database that went away just now is no reason to stop; the services' own loops go
        on trying."""
        try:
            await rescuer.rescue_once(until=self._stop)
            await lanes.maintain_once()
            await watch.read_once()
            await heartbeat.beat()
        except Exception as exc:
            if not db.is_transient(exc):
                raise

    async def _produce(self, claimer: Claimer) -> None:
        """Claim whenever slots are free and work may be due: at start, on a notification,
        after a write that freed slots without refilling them, and every poll interval."""
        opts = self.options
        slots = self._slots
        while not self._stop.is_set():
            slots.changed.clear()
            try:
                asked, started = await db.retrying("claim", claimer.claim, until=self._stop)
            except Exception:
                if self._stop.is_set():
                    return
                raise
            if asked and started == asked:
                continue  # more may be due: claim again while slots are free
            if opts.burst and asked and not started and slots.idle():
                self.log.info("burst_done")
                slots.close()
                return
            if opts.burst and not slots.idle():
                await slots.changed.wait()  # a finishing job may have enqueued more work
            else:
                wait = min(opts.poll_interval, claimer.retry_within or opts.poll_interval)
                await db.sleep_or_stop(slots.changed, wait)

    async def _execute(self, job: ClaimedJob, executor: Executor, completer: Completer) -> None:
        try:
            outcome: Outcome = await executor.run(job)
        except BaseException as exc:
            # Executor.run catches whatever handlers raise; this is the worker's own failure
            # on this job, which must still end in an outcome or the slot and lease are held
            # for ever. Swallowing a cancellation here is right: only the worker cancels
            # these tasks, and it wants the outcome.
            self.log.exception("job_not_run", job_id=job.id)
            outcome = Failed(
                job.id, job.attempt, f"worker error: {describe_error(exc)}", self.options.retry_base
            )
        finally:
            self._slots.finished(job.id)
        completer.put(outcome)

    async def _drain(self) -> None:
        """Give in-flight jobs the drain timeout, release the rest, wait for the outcomes;
        each step bounded (see STOP_GRACE_SECONDS)."""
        opts = self.options
        slots = self._slots
        running = list(slots.running().values())
        if running:
            self.log.info("draining", jobs=len(running), timeout=opts.drain_timeout)
            _, pending = await asyncio.wait(running, timeout=opts.drain_timeout)
            if pending:
                slots.stop_all()
                _, stuck = await asyncio.wait(pending, timeout=CANCEL_GRACE_SECONDS)
                if stuck:
                    self.stuck = list(stuck)
                    self.log.error(
                        "handlers_ignored_cancellation",
                        jobs=[job_id for job_id, task in slots.running().items() if task in stuck],
                        hint="their leases lapse once the worker has stopped, and a rescuer "
                        "takes the jobs back",
                    )
        # The completer writes what is left, retrying a database that is away until the
        # grace ends; then the leases expire and another worker's rescuer takes over.
        loop = asyncio.get_running_loop()
        give_up = loop.call_later(STOP_GRACE_SECONDS, self._give_up_writes.set)
        try:
            while len(slots.held) > len(self.stuck) and not self._give_up_writes.is_set():
                slots.changed.clear()
                await db.sleep_or_stop(slots.changed, 0.1)
        finally:
            give_up.cancel()
        unwritten = [job_id for job_id in slots.held if not slots.is_running(job_id)]
        if unwritten:
            self.log.error(
                "outcomes_not_written",
                jobs=unwritten,
                hint="the database did not take them before the stop; their leases lapse and "
                "a rescuer takes the jobs back",
            )


def _cancel(tasks: dict[str, asyncio.Task[None]], services: list[Service]) -> None:
    for service in services:
        tasks[service.name].cancel()


async def _close_pool(pool: asyncpg.Pool) -> None:
    """Close gracefully, but never wait long: a handler that ignored its cancellation may
    still hold a connection."""
    try:
        await asyncio.wait_for(pool.close(), timeout=STOP_GRACE_SECONDS)
    except TimeoutError:
        pool.terminate()
