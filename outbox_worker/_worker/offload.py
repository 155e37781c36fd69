"""Where the handlers that are not coroutines run: plain ``def`` handlers in a bounded pool
of threads, ``run_in="process"`` ones in the worker's handler processes (processes.py).

A thread cannot be interrupted. When its attempt ends first (its timeout, an operator's
cancel, the worker's stop, a lapsing lease), the attempt's outcome is written as for an async
handler, and the thread runs on until it returns: its ``ctx.stopped`` turns True, its
progress reports are dropped, and what it returns or raises is discarded. Until then it keeps
its thread and its slot of the worker (``Slots.linger``), so a worker never runs more handler
threads than its pool holds, nor more handlers than its concurrency, and a worker whose
threads hang claims fewer jobs rather than jobs it has no thread for. Its time waiting for a
thread is not part of the task's timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import json
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import structlog

from outbox_worker._worker.processes import HandlerProcesses
from outbox_worker.context import JobContext, OffloadedContext
from outbox_worker.registry import TaskSpec


def thread_context(ctx: JobContext, loop: asyncio.AbstractEventLoop) -> OffloadedContext:
    """``ctx`` for a handler in a thread: its progress reports are handed to the event loop
    (and dropped once the attempt has ended, so that a thread that runs on never reports
    into a later attempt of the same job)."""

    def report(text: str) -> None:
        if offloaded.stopped:
            return
        with contextlib.suppress(RuntimeError):  # a closed event loop: the worker has stopped
            loop.call_soon_threadsafe(deliver, text)

    def deliver(text: str) -> None:
        if not offloaded.stopped:
            ctx.progress(json.loads(text))

    offloaded = OffloadedContext(
        job_id=ctx.job_id,
        task=ctx.task,
        queue=ctx.queue,
        attempt=ctx.attempt,
        max_attempts=ctx.max_attempts,
        correlation_id=ctx.correlation_id,
        worker_id=ctx.worker_id,
        pool=None,
        log=ctx.log,
        cancel_requested=lambda: ctx.cancel_requested,
        report_progress=report,
    )
    return offloaded


def _call_sync(handler: Callable[..., Any], ctx: JobContext, args: dict[str, Any]) -> Any:
    value = handler(ctx, **args)
    if inspect.isawaitable(value):
        if inspect.iscoroutine(value):
            value.close()
        raise TypeError(
            f"task {ctx.task!r} returned an awaitable from a plain def: make it an async def"
        )
    return value


class HandlerThreads:
    """At most ``size`` handler threads at once, those running on past their attempt
    included. The pool starts its threads as they are first needed."""

    def __init__(self, size: int, *, linger: Callable[[int], None] = lambda change: None) -> None:
        """``linger`` hears of a thread that runs on past its attempt (+1) and of its end
        (-1): the worker's slots count it."""
        self.size = size
        self._linger = linger
        self._free = asyncio.Semaphore(size)
        self._pool: ThreadPoolExecutor | None = None

    async def call(
        self,
        spec: TaskSpec,
        ctx: JobContext,
        args: dict[str, Any],
        deadline: asyncio.Timeout | None,
    ) -> Any:
        """The handler's value, run in a thread once one is free; the deadline starts then."""
        await self._free.acquire()
        loop = asyncio.get_running_loop()
        offloaded = thread_context(ctx, loop)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.size, thread_name_prefix="outbox-sync-handler")
        try:
            future = self._pool.submit(
                contextvars.copy_context().run, _call_sync, spec.handler, offloaded, args
            )
        except BaseException:
            self._free.release()
            raise
        lingering: list[float] = []
        future.add_done_callback(functools.partial(self._returned, loop, lingering, offloaded))
        try:
            if deadline is None:
                return await asyncio.wrap_future(future)
            async with deadline:
                deadline.reschedule(loop.time() + (spec.timeout or 0.0))
                return await asyncio.wrap_future(future)
        except BaseException:
            if not future.done():
                offloaded.stop()
                lingering.append(time.monotonic())
                self._linger(1)
                offloaded.log.warning(
                    "handler_thread_runs_on",
                    hint="a thread cannot be interrupted: it keeps its thread and its slot "
                    "until it returns, ctx.stopped is True, and what it returns is discarded",
                )
            raise

    def _returned(
        self,
        loop: asyncio.AbstractEventLoop,
        lingering: list[float],
        ctx: OffloadedContext,
        future: Future[Any],
    ) -> None:
        """In the handler's thread (or the loop's, for a call cancelled before it began)."""
        # A closed event loop: the worker has stopped, and nothing is counted any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._release, lingering, ctx, future)

    def _release(self, lingering: list[float], ctx: OffloadedContext, future: Future[Any]) -> None:
        self._free.release()
        if lingering:
            self._linger(-1)
            failed = None if future.cancelled() else future.exception()
            ctx.log.info(
                "handler_thread_returned",
                after_attempt_seconds=round(time.monotonic() - lingering[0], 3),
                raised=None if failed is None else type(failed).__name__,
            )

    def close(self) -> None:
        """Let the idle threads go; one still running is left to end (or to the process's
        exit)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class Offload:
    """The worker's places for handlers that are not coroutines: its thread pool, and its
    pool of handler processes, started when a ``run_in="process"`` job first comes."""

    def __init__(
        self,
        *,
        threads: int,
        processes: int,
        log: structlog.typing.FilteringBoundLogger,
        linger: Callable[[int], None] = lambda change: None,
    ) -> None:
        self.threads = HandlerThreads(threads, linger=linger)
        self.processes = HandlerProcesses(processes, log=log)

    async def call(
        self,
        spec: TaskSpec,
        ctx: JobContext,
        args: dict[str, Any],
        deadline: asyncio.Timeout | None,
    ) -> Any:
        if spec.run_in == "process":
            return await self.processes.call(spec, ctx, args, deadline)
        return await self.threads.call(spec, ctx, args, deadline)

    async def close(self) -> None:
        self.threads.close()
        await self.processes.close()


@asynccontextmanager
async def offload_for_one(
    log: structlog.typing.FilteringBoundLogger,
) -> AsyncIterator[Offload]:
    """An Offload for code that runs one job at a time (outbox_worker.testing's drain):
    threads enough that one running on past its timeout holds nothing up, one process."""
    offload = Offload(threads=32, processes=1, log=log)
    try:
        yield offload
    finally:
        await offload.close()
