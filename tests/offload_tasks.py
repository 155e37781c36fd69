"""Tasks of the tests of plain ``def`` handlers: in the worker's threads and in its handler
processes (tests/test_sync_handlers.py, tests/test_process_handlers.py). A module of its own,
importable by name, as a handler process imports its handler; run in process by the tests'
own workers and drains, and as ``tests.offload_tasks:registry`` by worker processes."""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
import time
from pathlib import Path
from typing import Any

from opentelemetry import trace

from outbox_worker import (
    CancelJob,
    JobContext,
    Registry,
    RetryJob,
    RetryPolicy,
    SnoozeJob,
)

registry = Registry()


class Threads:
    """What the handlers in threads of this process did, for the tests to read."""

    lock = threading.Lock()
    running = 0
    most = 0
    # (job id, saw ctx.stopped) for each handler that ran to its end.
    ended: list[tuple[int, bool]] = []  # noqa: RUF012 -- one record for the process

    @classmethod
    def reset(cls) -> None:
        with cls.lock:
            cls.running = cls.most = 0
            cls.ended = []


# ---------------------------------------------------------------------------------------------
# In a thread
# ---------------------------------------------------------------------------------------------


@registry.task(max_attempts=3)
def add(ctx: JobContext, a: int, b: int) -> dict[str, Any]:
    """Adds, in a thread; fails on a negative ``a``."""
    if a < 0:
        raise ValueError(f"a is negative: {a}")
    return {"sum": a + b, "thread": threading.current_thread().name, "attempt": ctx.attempt}


@registry.task()
def sleeps(ctx: JobContext, seconds: float) -> str:
    """Blocks its thread, reporting its progress before it does."""
    ctx.progress({"sleeping": seconds})
    time.sleep(seconds)
    return "awake"


@registry.task(timeout=0.2, max_attempts=1)
def overruns(ctx: JobContext, seconds: float) -> str:
    """Runs past its timeout, in steps, counting the threads of this process that run it."""
    with Threads.lock:
        Threads.running += 1
        Threads.most = max(Threads.most, Threads.running)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.02)
        return "late"
    finally:
        with Threads.lock:
            Threads.running -= 1
            Threads.ended.append((ctx.job_id, ctx.stopped))


@registry.task()
def wants_a_transaction(ctx: JobContext) -> None:
    ctx.transaction()


@registry.task()
async def quick(ctx: JobContext) -> float:
    """An async job: when it started (time.time()), to set against its enqueue."""
    return time.time()


@registry.task()
async def notes_threads(ctx: JobContext) -> int:
    """How many ``overruns`` threads were still running when this async job started."""
    await asyncio.sleep(0)
    return Threads.running


# ---------------------------------------------------------------------------------------------
# In a handler process
# ---------------------------------------------------------------------------------------------


@registry.task(run_in="process")
def whoami(ctx: JobContext, n: int = 0) -> dict[str, Any]:
    """Where and as what it ran."""
    ctx.progress({"n": n})
    return {
        "pid": os.getpid(),
        "parent": os.getppid(),
        "job_id": ctx.job_id,
        "attempt": ctx.attempt,
        "worker_id": ctx.worker_id,
        "n": n,
        "tuple": (1, 2),
    }


@registry.task(
    run_in="process", timeout=1.0, max_attempts=2, retry=RetryPolicy(backoff=lambda n: 60.0)
)
def spins(ctx: JobContext, pid_file: str) -> None:
    """Writes its pid, then burns CPU for ever: only a kill ends it."""
    Path(pid_file).write_text(str(os.getpid()))
    while True:
        pass


@registry.task(run_in="process")
def current_span(ctx: JobContext) -> dict[str, str]:
    """The ids of the span current in its process, in hex (zeros: none)."""
    context = trace.get_current_span().get_span_context()
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


@registry.task(run_in="process")
def burns(ctx: JobContext, seconds: float) -> int:
    """Burns CPU for ``seconds``, its pid in its progress; returns how many loops it made."""
    ctx.progress({"pid": os.getpid()})
    loops = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        loops += 1
    return loops


@registry.task(run_in="process", max_attempts=1)
def dies(ctx: JobContext, how: str) -> None:
    """Its process dies under it: an exit that skips everything, or a segfault."""
    if how == "exit":
        os._exit(3)
    ctypes.string_at(0)


class Unpicklable(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"code {code}: {detail}")


@registry.task(
    run_in="process",
    max_attempts=3,
    retry=RetryPolicy(retry_on=(ConnectionError,), give_up_on=(KeyError,)),
)
def raises(ctx: JobContext, kind: str) -> None:
    """Raises what a handler may raise; each crosses back to the worker as itself."""
    if kind == "connection":
        raise ConnectionResetError("reset by peer")
    if kind == "key":
        raise KeyError("customer_id")
    if kind == "unpicklable":
        raise Unpicklable(7, "no way back")
    if kind == "snooze":
        raise SnoozeJob(30)
    if kind == "cancel":
        raise CancelJob("not wanted")
    if kind == "retry":
        raise RetryJob(40, "later, please")
    if kind == "exit":
        raise SystemExit(5)
    raise LookupError(kind)


@registry.task(run_in="process")
def not_json(ctx: JobContext) -> Any:
    return {1, 2}
