"""Run one attempt of one job and say what became of it. No SQL here but the handler's own."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import traceback
from collections.abc import Callable

import asyncpg
import structlog
from prometheus_client import Counter, Histogram

from outbox_worker import metrics, tracing
from outbox_worker._worker.claims import ClaimedJob
from outbox_worker._worker.offload import Offload
from outbox_worker._worker.outcomes import (
    Abandoned,
    Cancelled,
    Failed,
    Outcome,
    Released,
    Settled,
    Snoozed,
    StopReason,
    Succeeded,
)
from outbox_worker._worker.storable import encode_result, storable_text
from outbox_worker.context import JobContext, current_correlation_id
from outbox_worker.control import MAX_DELAY_SECONDS, CancelJob, JobControl, RetryJob, SnoozeJob
from outbox_worker.errors import LeaseLost
from outbox_worker.formatting import error_line
from outbox_worker.registry import Registry, TaskSpec

MAX_ERROR_CHARS = 8000


def describe_error(exc: BaseException) -> str:
    """A last_error a person can read, and the database can store: the exception first,
    then the tail of the traceback."""
    try:
        message = str(exc)
    except Exception:  # a user's __str__ that raises must not cost the outcome
        message = "<str() of the exception failed>"
    trace = "".join(traceback.format_exception(exc)[-12:])
    text = storable_text(f"{type(exc).__name__}: {message}\n\n{trace}")
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


class Executor:
    def __init__(
        self,
        *,
        registry: Registry,
        worker_id: str,
        pool: asyncpg.Pool,
        retry_delay: Callable[[int], float],
        stop_reason: Callable[[int], StopReason | None],
        log: structlog.typing.FilteringBoundLogger,
        offload: Offload,
        report_progress: Callable[[int, str], None] = lambda job_id, progress: None,
    ) -> None:
        """``offload`` runs the plain ``def`` handlers (in threads, or in processes)."""
        self._registry = registry
        self._offload = offload
        self._worker_id = worker_id
        self._pool = pool
        self._retry_delay = retry_delay
        self._stop_reason = stop_reason
        self._report_progress = report_progress
        self._log = log
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._debug = log.is_enabled_for(logging.DEBUG)

    async def run(self, job: ClaimedJob) -> Outcome:
        """Never raises: whatever the handler raises, its attempt ends in an outcome."""
        structlog.contextvars.bind_contextvars(
            job_id=job.id, task=job.task, attempt=job.attempt, correlation_id=job.correlation_id
        )
        current_correlation_id.set(job.correlation_id)
        spec = self._registry.get(job.task)
        if spec is None:
            return self._give_up(
                job,
                f"unknown task {job.task!r}: this worker's registry "
                f"has {sorted(s.name for s in self._registry)}",
            )
        try:
            args = json.loads(job.args)
        except ValueError as exc:
            return self._give_up(job, f"args are not valid JSON: {exc}")
        except RecursionError:
            return self._give_up(job, "args are nested too deeply to decode")
        if not isinstance(args, dict):
            return self._give_up(job, f"args must be a JSON object, got {type(args).__name__}")
        misfit = spec.check_args(args)
        if misfit is not None:
            return self._give_up(job, misfit)

        ctx = JobContext(
            job_id=job.id,
            task=job.task,
            queue=job.queue,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            correlation_id=job.correlation_id,
            worker_id=self._worker_id,
            pool=self._pool,
            log=self._log,
            cancel_requested=functools.partial(self._cancel_requested, job.id),
            report_progress=functools.partial(self._report_progress, job.id),
        )
        if self._debug:
            ctx.log.debug("job_started")
        started, run_seconds = self._metrics(job.task, job.queue)
        started.inc()
        deadline = None if spec.timeout is None else asyncio.timeout(spec.timeout)
        began = time.perf_counter()
        try:
            try:
                with tracing.processing(job, self._worker_id):
                    if spec.run_in != "loop":
                        value = await self._offload.call(spec, ctx, args, deadline)
                    elif deadline is None:
                        value = await spec.handler(ctx, **args)
                    else:
                        async with deadline:
                            value = await spec.handler(ctx, **args)
            finally:
                run_seconds.observe(time.perf_counter() - began)
        except asyncio.CancelledError as exc:
            if ctx.completed_in_transaction:
                return Settled(job.id, job.attempt)
            reason = self._stop_reason(job.id)
            if reason is StopReason.CANCEL:
                ctx.log.info("job_cancelled")
                return Cancelled(job.id, job.attempt)
            if reason is StopReason.SHUTDOWN:
                ctx.log.info("job_released", reason="worker shutting down")
                return Released(job.id, job.attempt)
            if reason is StopReason.LEASE:
                return Abandoned(job.id, job.attempt)
            # Nobody here cancelled it: the handler's own code did (a cancelled inner task
            # or future). That is the handler failing, not a reason to end the worker.
            return self._failed(job, ctx, spec, exc)
        except LeaseLost as exc:
            ctx.log.warning("job_lease_lost", error=str(exc))
            return Settled(job.id, job.attempt)
        except BaseException as exc:
            # Exception, and also what is not one (SystemExit, KeyboardInterrupt, a library's
            # own BaseException): one handler must never end the worker or hold its slot.
            if ctx.completed_in_transaction:
                ctx.log.warning("job_raised_after_commit", error=error_line(exc))
                return Settled(job.id, job.attempt)
            if isinstance(exc, JobControl):
                return self._controlled(job, ctx, spec, exc)
            if not isinstance(exc, Exception):
                ctx.log.error(
                    "job_raised_base_exception",
                    error=type(exc).__name__,
                    hint="a handler cannot stop the worker; it fails this attempt only "
                    "(stop a worker with SIGTERM)",
                )
            return self._failed(job, ctx, spec, exc, deadline)
        if self._debug:
            ctx.log.debug("job_succeeded", in_transaction=ctx.completed_in_transaction)
        if ctx.completed_in_transaction:
            return Settled(job.id, job.attempt)
        result = encode_result(value)
        if result.problem is not None:
            ctx.log.warning("job_result_unstorable", detail=result.problem)
        return Succeeded(job.id, job.attempt, result.json)

    def _cancel_requested(self, job_id: int) -> bool:
        return self._stop_reason(job_id) is StopReason.CANCEL

    def _controlled(
        self, job: ClaimedJob, ctx: JobContext, spec: TaskSpec, exc: JobControl
    ) -> Outcome:
        """The end the handler chose by raising SnoozeJob, CancelJob or RetryJob."""
        if isinstance(exc, SnoozeJob):
            ctx.log.info("job_snoozed", seconds=exc.seconds)
            return Snoozed(job.id, job.attempt, exc.seconds, spec.max_snoozes)
        if isinstance(exc, CancelJob):
            ctx.log.info("job_cancelled_by_handler", reason=exc.reason)
            return Cancelled(job.id, job.attempt, storable_text(exc.reason))
        if isinstance(exc, RetryJob):
            final = job.attempt >= job.max_attempts
            ctx.log.warning(
                "job_retry_requested",
                reason=exc.reason,
                final=final,
                retry_in=None if final else exc.seconds,
            )
            return Failed(
                job.id, job.attempt, storable_text(f"RetryJob: {exc.reason}"), exc.seconds
            )
        return self._failed(job, ctx, spec, exc)

    def _failed(
        self,
        job: ClaimedJob,
        ctx: JobContext,
        spec: TaskSpec,
        exc: BaseException,
        deadline: asyncio.Timeout | None = None,
    ) -> Failed:
        if deadline is not None and deadline.expired():
            error = f"TimeoutError: {job.task} ran longer than its timeout of {spec.timeout}s"
        else:
            error = describe_error(exc)
        give_up = not spec.retries(exc)
        delay = self._delay(job, ctx, spec)
        final = give_up or job.attempt >= job.max_attempts
        ctx.log.warning(
            "job_failed",
            error=error.partition("\n")[0],
            final=final,
            retry_in=None if final else round(delay, 3),
            **({"policy": "no retry for this exception"} if give_up else {}),
        )
        return Failed(job.id, job.attempt, error, delay, give_up)

    def _delay(self, job: ClaimedJob, ctx: JobContext, spec: TaskSpec) -> float:
        """The task's backoff, or the worker's when it has none or its answer is unusable."""
        if spec.backoff is None:
            return self._retry_delay(job.attempt)
        try:
            delay = float(spec.backoff(job.attempt))
        except Exception as exc:
            ctx.log.error("task_backoff_failed", error=error_line(exc))
            return self._retry_delay(job.attempt)
        if not 0 <= delay <= MAX_DELAY_SECONDS:  # also false for NaN
            ctx.log.error("task_backoff_out_of_range", delay=repr(delay))
            return self._retry_delay(job.attempt)
        return delay

    def _metrics(self, task: str, queue: str) -> tuple[Counter, Histogram]:
        """The labelled children, looked up once per (task, queue) rather than per job."""
        key = (task, queue)
        children = self._children.get(key)
        if children is None:
            children = (
                metrics.STARTED.labels(task, queue),
                metrics.RUN_SECONDS.labels(task, queue),
            )
            self._children[key] = children
        return children

    def _give_up(self, job: ClaimedJob, reason: str) -> Failed:
        self._log.error(
            "job_dead_without_running",
            reason=reason,
            job_id=job.id,
            task=job.task,
            attempt=job.attempt,
            correlation_id=job.correlation_id,
        )
        return Failed(job.id, job.attempt, reason, 0.0, give_up=True)
