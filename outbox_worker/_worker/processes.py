"""The worker's handler processes, for ``run_in="process"`` tasks: CPU-bound work off the
event loop and out of its GIL, with a timeout that can really stop it.

A child is started with multiprocessing's "spawn" (a fresh interpreter: a fork of a process
that runs an event loop, threads and open connections would copy them half-made) when a
process job finds none idle, up to the pool's size, and serves one call at a time over a
pipe of its own (child.py). Args go to it as JSON and the result comes back as JSON; what
the handler raises comes back pickled, its traceback as text. Its start is not part of the
task's timeout; importing the handler's module in a fresh child is.

A child is killed (SIGKILL) when its attempt ends without it: the task's timeout passed, an
operator cancelled the job, the worker stopped it, or its lease is lapsing. A child that dies
for any reason fails the attempt it ran with HandlerProcessDied and is not reused; the next
process job starts another. A child never outlives the worker: the worker kills its children
when it stops (at the latest when its interpreter exits), and a child whose worker died,
even by SIGKILL, exits as soon as it sees that.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import multiprocessing
import pickle
import signal
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import structlog

from outbox_worker import tracing
from outbox_worker._worker.child import serve
from outbox_worker.context import JobContext
from outbox_worker.control import CancelJob, RetryJob, SnoozeJob
from outbox_worker.errors import HandlerProcessDied, OutboxError
from outbox_worker.registry import TaskSpec

# Once a child's end is seen, how long its exit status may take to be readable; and how long
# a stopping worker waits for the children it killed to be gone.
REAP_SECONDS = 5.0


class HandlerProcessError(Exception):
    """What a process handler raised, when it cannot be rebuilt as itself in the worker (an
    exception that does not pickle): its type's name and message."""


def died(exitcode: int | None) -> str:
    """The last_error of an attempt whose process died: how, as far as the exit status says."""
    if exitcode is None:
        return "the handler's process died"
    if exitcode >= 0:
        return f"the handler's process died (exit code {exitcode})"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    hint = ", not by the worker: the out-of-memory killer?" if -exitcode == signal.SIGKILL else ""
    return f"the handler's process died (exit code {exitcode}: {name}{hint})"


class _Child:
    """One handler process: its pipe, the answers it sent, and its end."""

    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.pid = process.pid
        self.conn = conn
        self.answers: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.exitcode: int | None = None
        self._loop = asyncio.get_running_loop()
        self._gone: asyncio.Future[None] = self._loop.create_future()
        self._fd = conn.fileno()
        self._sentinel = process.sentinel
        self._loop.add_reader(self._fd, self._read)
        self._loop.add_reader(self._sentinel, self._ended)
        self.ended = self._loop.create_task(self._reap(), name=f"outbox-handler-{self.pid}")

    @property
    def alive(self) -> bool:
        return not self._gone.done()

    def send(self, payload: bytes) -> None:
        try:
            self.conn.send_bytes(payload)
        except OSError:
            self._ended()  # its end is closed: it is dying, and its exit status says how

    def kill(self) -> None:
        if self.exitcode is None:
            self.process.kill()

    def _read(self) -> None:
        try:
            while self.conn.poll():
                self.answers.put_nowait(self.conn.recv())
        except Exception:
            self._ended()  # EOF: it is gone; anything else: it is of no use any more

    def _ended(self) -> None:
        if not self._gone.done():
            self._loop.remove_reader(self._fd)
            self._loop.remove_reader(self._sentinel)
            self._gone.set_result(None)
        self.kill()

    async def _reap(self) -> None:
        await self._gone
        waited = 0.0
        while (code := self.process.exitcode) is None and waited < REAP_SECONDS:
            await asyncio.sleep(0.005)
            waited += 0.005
        self.exitcode = code
        self.conn.close()
        if code is not None:
            self.process.close()
        self.answers.put_nowait(("died", code))


class HandlerProcesses:
    """At most ``size`` handler processes, started as jobs need them."""

    def __init__(self, size: int, *, log: structlog.typing.FilteringBoundLogger) -> None:
        self.size = size
        self._log = log
        self._free = asyncio.Semaphore(size)
        self._idle: list[_Child] = []
        self._children: set[_Child] = set()
        self._spawn = multiprocessing.get_context("spawn")
        self._closed = False
        self._at_exit = False

    async def call(
        self,
        spec: TaskSpec,
        ctx: JobContext,
        args: dict[str, Any],
        deadline: asyncio.Timeout | None,
    ) -> Any:
        """The handler's value, from a child once one is free; the deadline starts then."""
        async with self._free:
            child = await self._take()
            try:
                answer = await self._ask(child, spec, ctx, args, deadline)
            except BaseException:
                # Out of time, or stopped by the worker: killing is the one way to end the
                # handler, and the child is not reused.
                child.kill()
                ctx.log.warning("handler_process_killed", pid=child.pid)
                raise
            if answer[0] != "died":
                self._idle.append(child)
        return _value(answer, ctx, child.pid)

    async def _take(self) -> _Child:
        while self._idle:
            child = self._idle.pop()
            if child.alive:
                return child
        return await self._start()

    async def _start(self) -> _Child:
        if self._closed:
            raise OutboxError("the worker's handler processes are closed: it is stopping")
        parent_end, child_end = self._spawn.Pipe()
        process = self._spawn.Process(target=serve, args=(child_end,), name="outbox-handler")
        process.start()
        child_end.close()
        if not self._at_exit:
            # Should the worker's interpreter exit without close() (an embedder's error),
            # multiprocessing would wait for the children, which ignore SIGTERM, for ever.
            atexit.register(self._kill_all)
            self._at_exit = True
        child = _Child(process, parent_end)
        self._children.add(child)
        child.ended.add_done_callback(lambda _: self._children.discard(child))
        try:
            answer = await child.answers.get()
        except BaseException:
            child.kill()
            raise
        if answer[0] != "ready":
            raise HandlerProcessDied(
                f"{died(answer[1])} as it started (its traceback, if any, is on the worker's "
                "stderr; a main module needs its if __name__ == '__main__' guard)"
            )
        self._log.info("handler_process_started", pid=child.pid)
        return child

    async def _ask(
        self,
        child: _Child,
        spec: TaskSpec,
        ctx: JobContext,
        args: dict[str, Any],
        deadline: asyncio.Timeout | None,
    ) -> tuple[Any, ...]:
        request = {
            "module": spec.handler.__module__,
            "name": spec.handler.__qualname__,
            "args": args,
            "ctx": {
                "job_id": ctx.job_id,
                "task": ctx.task,
                "queue": ctx.queue,
                "attempt": ctx.attempt,
                "max_attempts": ctx.max_attempts,
                "correlation_id": ctx.correlation_id,
                "worker_id": ctx.worker_id,
            },
            "trace": tracing.carrier(),
        }
        child.send(json.dumps(request).encode())
        if deadline is None:
            return await _answer(child, ctx)
        async with deadline:
            deadline.reschedule(asyncio.get_running_loop().time() + (spec.timeout or 0.0))
            return await _answer(child, ctx)

    def _kill_all(self) -> None:
        for child in list(self._children):
            child.kill()

    async def close(self) -> None:
        """Kill every child (a stopping worker runs no handler any more) and wait for them
        to be gone."""
        self._closed = True
        self._kill_all()
        ends = [child.ended for child in self._children]
        if ends:
            await asyncio.wait(ends, timeout=REAP_SECONDS)
        atexit.unregister(self._kill_all)


async def _answer(child: _Child, ctx: JobContext) -> tuple[Any, ...]:
    """The child's last word on this call, its progress reports passed on meanwhile."""
    while True:
        message = await child.answers.get()
        if message[0] != "progress":
            return message
        with contextlib.suppress(TypeError, ValueError):  # the child's context checked it
            ctx.progress(json.loads(message[1]))


def _value(answer: tuple[Any, ...], ctx: JobContext, pid: int | None) -> Any:
    """What the handler returned, or what it raised raised again here."""
    kind = answer[0]
    if kind == "ok":
        _, text, problem = answer
        if problem is not None:
            ctx.log.warning("job_result_unstorable", detail=problem)
        return None if text is None else json.loads(text)
    if kind == "died":
        raise HandlerProcessDied(died(answer[1]))
    if kind == "snooze":
        raise SnoozeJob(answer[1])
    if kind == "cancel":
        raise CancelJob(answer[1])
    if kind == "retry":
        raise RetryJob(answer[1], answer[2])
    _, payload, name, message, trace = answer
    exc: BaseException = HandlerProcessError(f"{name}: {message}")
    if payload is not None:
        with contextlib.suppress(Exception):
            exc = pickle.loads(payload)  # noqa: S301 -- from our own child, running our code
    exc.add_note(f"raised in the handler's process (pid {pid}):\n{trace.rstrip()}")
    raise exc
