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

from outbox_worker import metrics
from outbox_worker.context import JobContext, current_correlation_id, encode_result
from outbox_worker.errors import LeaseLost
from outbox_worker.outcomes import (
    Cancelled,
    ClaimedJob,
    Failed,
    Outcome,
    Released,
    Settled,
    Succeeded,
)
from outbox_worker.registry import Registry

MAX_ERROR_CHARS = 8000


def describe_error(exc: BaseException) -> str:
    """A last_error a person can read: the exception first, then the tail of the traceback."""
    headline = f"{type(exc).__name__}: {exc}"
    trace = "".join(traceback.format_exception(exc)[-12:])
    text = f"{headline}\n\n{trace}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


class Executor:
    def __init__(
        self,
        *,
        registry: Registry,
        worker_id: str,
        pool: asyncpg.Pool,
        retry_delay: Callable[[int], float],
        is_cancelling: Callable[[int], bool],
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._registry = registry
        self._worker_id = worker_id
        self._pool = pool
        self._retry_delay = retry_delay
        self._is_cancelling = is_cancelling
        self._log = log
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._debug = log.is_enabled_for(logging.DEBUG)

    async def run(self, job: ClaimedJob) -> Outcome:
        """Never raises but for cancellation outside a shutdown."""
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
            cancel_requested=functools.partial(self._is_cancelling, job.id),
        )
        if self._debug:
            ctx.log.debug("job_started")
        started, run_seconds = self._metrics(job.task, job.queue)
        started.inc()
        deadline = None if spec.timeout is None else asyncio.timeout(spec.timeout)
        began = time.perf_counter()
        try:
            try:
                if deadline is None:
                    value = await spec.handler(ctx, **args)
                else:
                    async with deadline:
                        value = await spec.handler(ctx, **args)
            finally:
                run_seconds.observe(time.perf_counter() - began)
        except asyncio.CancelledError:
            if ctx.completed_in_transaction:
                return Settled(job.id, job.attempt)
            if self._is_cancelling(job.id):
                ctx.log.info("job_cancelled")
                return Cancelled(job.id, job.attempt)
            ctx.log.info("job_released", reason="worker shutting down")
            return Released(job.id, job.attempt)
        except LeaseLost as exc:
            ctx.log.warning("job_lease_lost", error=str(exc))
            return Settled(job.id, job.attempt)
        except Exception as exc:
            if ctx.completed_in_transaction:
                ctx.log.warning("job_raised_after_commit", error=f"{type(exc).__name__}: {exc}")
                return Settled(job.id, job.attempt)
            if deadline is not None and deadline.expired():
                error = f"TimeoutError: {job.task} ran longer than its timeout of {spec.timeout}s"
            else:
                error = describe_error(exc)
            delay = self._retry_delay(job.attempt)
            ctx.log.warning(
                "job_failed",
                error=error.partition("\n")[0],
                final=job.attempt >= job.max_attempts,
                retry_in=None if job.attempt >= job.max_attempts else round(delay, 3),
            )
            return Failed(job.id, job.attempt, error, delay)
        if self._debug:
            ctx.log.debug("job_succeeded", in_transaction=ctx.completed_in_transaction)
        if ctx.completed_in_transaction:
            return Settled(job.id, job.attempt)
        return Succeeded(job.id, job.attempt, encode_result(value))

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
