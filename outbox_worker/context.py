"""What a handler gets: who it is, a bound logger, and an effectively-once transaction."""

from __future__ import annotations

import contextvars
import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import asyncpg
import structlog

from outbox_worker import sql
from outbox_worker._worker.storable import encode_result
from outbox_worker.errors import LeaseLost, OutboxError

# A progress report is written with every heartbeat of a running job: kept small.
MAX_PROGRESS_BYTES = 4096

# The request (or job) that is causing enqueues right now: enqueue stores it as
# correlation_id when none is given. The app's middleware and the worker set it.
current_correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "outbox_correlation_id", default=None
)


class JobContext:
    """One attempt of one job, as its handler sees it.

    ``attempt`` is 1 on the first run and equals the row's ``attempts`` while it runs.
    """

    def __init__(
        self,
        *,
        job_id: int,
        task: str,
        queue: str,
        attempt: int,
        max_attempts: int,
        correlation_id: str | None,
        worker_id: str,
        pool: asyncpg.Pool | None,
        log: structlog.typing.FilteringBoundLogger,
        cancel_requested: Callable[[], bool] = lambda: False,
        report_progress: Callable[[str], None] = lambda progress: None,
    ) -> None:
        self.job_id = job_id
        self.task = task
        self.queue = queue
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.correlation_id = correlation_id
        self.worker_id = worker_id
        self._log_base = log
        self._log: structlog.typing.FilteringBoundLogger | None = None
        self.result: Any = None
        self._pool = pool
        self._cancel_requested = cancel_requested
        self._report_progress = report_progress
        self._transaction_used = False
        self._stopped = False
        self.completed_in_transaction = False

    @property
    def log(self) -> structlog.typing.FilteringBoundLogger:
        """The logger given, bound to this job's fields (on first use: most jobs never log)."""
        if self._log is None:
            self._log = self._log_base.bind(
                job_id=self.job_id,
                task=self.task,
                attempt=self.attempt,
                correlation_id=self.correlation_id,
            )
        return self._log

    @property
    def cancel_requested(self) -> bool:
        """True once an operator asked to cancel this job. The worker then cancels the
        handler's task (CancelledError at its next await); a handler that must clean up can
        catch it, or poll this between steps of a long computation."""
        return self._cancel_requested()

    @property
    def stopped(self) -> bool:
        """True once the worker has stopped waiting for this attempt: its timeout passed, an
        operator cancelled the job, the worker is shutting down or its lease is lapsing. For
        a plain ``def`` handler in a thread, which nothing can interrupt: poll it between
        steps and return, since the attempt has ended and what it returns is discarded. An
        async handler is cancelled instead, and a handler in a process killed."""
        return self._stopped

    def progress(self, value: float | Mapping[str, Any]) -> None:
        """Report how far the job has got: a fraction from 0 to 1, or a small JSON object
        (``{"rows": 4000, "of": 10000}``). No round trip: the worker's next heartbeat writes
        the latest report with the lease it extends (a third of a lease later at most), so a
        job that ends before that keeps the report before. ``GET /jobs/{id}``, ``outbox-worker
        jobs show`` and the dashboard show it."""
        if isinstance(value, bool) or not isinstance(value, int | float | Mapping):
            raise TypeError(f"progress is a fraction or a JSON object, not {type(value).__name__}")
        if not isinstance(value, Mapping) and not 0 <= value <= 1:  # also False for NaN
            raise ValueError(f"progress as a fraction is from 0 to 1, not {value!r}")
        try:
            text = json.dumps(
                value if isinstance(value, int | float) else dict(value),
                allow_nan=False,
                separators=(",", ":"),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"progress must be JSON: {exc}") from exc
        if len(text) > MAX_PROGRESS_BYTES:
            raise ValueError(f"progress is {len(text)} bytes as JSON; at most {MAX_PROGRESS_BYTES}")
        self._report_progress(text)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction whose commit also completes this job (fenced).

        Writes made on the connection and the job's ``succeeded`` state commit together, so a
        crash can never leave the writes done and the job still due: work that touches only
        this database runs effectively once. If the lease was lost meanwhile, the writes roll
        back and :class:`LeaseLost` is raised. Set ``ctx.result`` inside the block to store
        a result. Usable once per attempt.
        """
        if self._pool is None:
            raise OutboxError("this JobContext has no database pool")
        if self._transaction_used:
            raise OutboxError("ctx.transaction() completes the job, so it can be used only once")
        self._transaction_used = True
        conn = await self._pool.acquire()
        try:
            async with conn.transaction():
                yield conn
                result = encode_result(self.result)
                if result.problem is not None:
                    self.log.warning("job_result_unstorable", detail=result.problem)
                done = await conn.fetch(
                    *sql.bind(
                        sql.JOB_COMPLETE_MANY,
                        ids=[self.job_id],
                        attempts=[self.attempt],
                        results=[result.json],
                        worker_id=self.worker_id,
                    )
                )
                if not done:
                    raise LeaseLost(
                        f"job {self.job_id} attempt {self.attempt} is no longer held by "
                        f"{self.worker_id}; its writes were rolled back"
                    )
            # Committed: the job is done whatever happens to the connection from here on.
            self.completed_in_transaction = True
        finally:
            try:
                await self._pool.release(conn)
            except Exception as exc:
                if not self.completed_in_transaction:
                    raise
                self.log.warning("connection_release_failed_after_commit", error=str(exc))


class OffloadedContext(JobContext):
    """The JobContext of a plain ``def`` handler, which runs outside the event loop: in one
    of the worker's threads, or in a handler process. ``ctx.transaction()`` needs the event
    loop, so it raises here."""

    def stop(self) -> None:
        """The attempt has ended without the handler: ``stopped`` tells it so."""
        self._stopped = True

    def transaction(self) -> NoReturn:
        raise OutboxError(
            "ctx.transaction() is for async handlers: it needs the worker's event loop, and "
            f"task {self.task!r} is a plain def, which runs outside it"
        )
