"""``outbox-worker run --processes N``: N worker processes under one supervisor, for a host
with more cores than one worker's event loop keeps busy.

Each child is ``outbox-worker run`` again, with the same registry and flags: a worker of its
own (its own id, pools, heartbeat and leases) that shares nothing with its siblings but the
database, as workers on different hosts share nothing else. So the supervisor coordinates
no work. It starts the children; restarts one that crashes, after a delay that doubles while
it keeps crashing, so that a child unable to start does not spin; passes SIGTERM and SIGINT
on, so that every child drains as a lone worker would; and serves the children's metrics as
one set. Each child writes its samples to files in a directory of the supervisor's
(prometheus-client's multiprocess mode, see :mod:`outbox_worker.metrics`), which the
supervisor reads at each scrape.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import structlog
import typer
from prometheus_client import CollectorRegistry, multiprocess
from typer.core import TyperOption

from outbox_worker.cli.run import start_metrics_server
from outbox_worker.formatting import one_line

# The flags of ``run`` that are the supervisor's own: its children get none of them, nor the
# variables they read (a child that read OUTBOX_METRICS_PORT would bind the supervisor's port).
OWN_FLAGS = frozenset({"processes", "metrics_port", "metrics_host", "supervisor_pid"})
FIRST_RESTART_DELAY_SECONDS = 1.0
MAX_RESTART_DELAY_SECONDS = 30.0
# A child that crashes after running this long is not crashing in a loop: it is restarted
# after the first delay again.
STABLE_SECONDS = 60.0
# Past the drain timeout, how long a stopping child gets before it is killed. A worker ends
# its own stop within its drain timeout and a few seconds of grace (worker.py); one still
# running long after that is hung (a handler holding its event loop). Killed, its jobs'
# leases lapse and a rescuer takes them back.
KILL_AFTER_DRAIN_SECONDS = 20.0
# How often the supervisor looks at its children and at the signals it was sent.
TICK_SECONDS = 0.1


def worker_args(ctx: typer.Context) -> list[str]:
    """``run``'s arguments for a child: every value given other than its default, as its flag
    gives it, less the supervisor's own flags. Rebuilt from what was parsed, so that a flag
    added to ``run`` reaches the children with no change here."""
    args: list[str] = []
    for param in ctx.command.params:
        if param.name is None or param.name in OWN_FLAGS:
            continue
        value = ctx.params[param.name]
        if value == param.default:
            continue
        if not isinstance(param, TyperOption):
            args.append(str(value))
        elif param.is_flag:
            args += (param.opts if value else param.secondary_opts)[:1]
        else:
            args += [param.opts[0], str(value)]
    return args


def worker_environment(ctx: typer.Context, environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` less the variables that the supervisor's own flags read."""
    own: set[str] = set()
    for param in ctx.command.params:
        if param.name in OWN_FLAGS and param.envvar:
            own.update([param.envvar] if isinstance(param.envvar, str) else param.envvar)
    return {name: value for name, value in environ.items() if name not in own}


@dataclass
class Child:
    """One of the supervisor's places for a worker process, and its crashes in a row."""

    slot: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    delay: float = FIRST_RESTART_DELAY_SECONDS
    restarts: int = 0
    # Exited 0 by itself (a --burst worker with nothing left to do): not replaced.
    done: bool = False


def exit_fields(returncode: int) -> dict[str, Any]:
    """How a child ended, for its log line: its exit code, or the signal that killed it."""
    if returncode >= 0:
        return {"exit_code": returncode}
    try:
        return {"signal": signal.Signals(-returncode).name}
    except ValueError:
        return {"signal": -returncode}


class Supervisor:
    """Keeps ``processes`` children running ``command`` until SIGTERM or SIGINT, then waits
    for them to drain, killing any still there ``kill_after`` seconds later.

    Signals are only noted by the handler and acted on by the loop, so that a child being
    started when one arrives is never missed by its forwarding."""

    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str],
        *,
        processes: int,
        kill_after: float,
        metrics_dir: str | None,
    ) -> None:
        self.command = list(command)
        self.env = dict(env)
        self.kill_after = kill_after
        self.metrics_dir = metrics_dir
        self.children = [Child(slot) for slot in range(processes)]
        self.log = structlog.get_logger("outbox_worker").bind(supervisor_pid=os.getpid())
        self._signals: list[signal.Signals] = []
        self._stopping = False
        self._kill_at: float | None = None

    def run(self) -> None:
        """Until every child has exited: after a stop, or each done by itself (--burst)."""
        stops = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.signal(sig, self._received) for sig in stops}
        try:
            self.log.info("supervisor_starting", processes=len(self.children))
            for child in self.children:
                self._start(child)
            while not self._finished():
                time.sleep(TICK_SECONDS)
                self._forward_signals()
                for child in self.children:
                    self._look_after(child)
                self._kill_hung()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.log.info("supervisor_stopped")

    def _received(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signal.Signals(signum))

    def _finished(self) -> bool:
        if self._stopping:
            return all(child.process is None for child in self.children)
        return all(child.done for child in self.children)

    def _forward_signals(self) -> None:
        while self._signals:
            sig = self._signals.pop(0)
            live = [child.process for child in self.children if child.process is not None]
            if not self._stopping:
                self._stopping = True
                self._kill_at = time.monotonic() + self.kill_after
                self.log.info("supervisor_stopping", signal=sig.name, processes=len(live))
            for process in live:
                process.send_signal(sig)

    def _start(self, child: Child) -> None:
        child.started_at = time.monotonic()
        child.restart_at = None
        try:
            process = subprocess.Popen(self.command, env=self.env, stdin=subprocess.DEVNULL)
        except OSError as exc:  # no memory or processes left to fork, the interpreter gone
            self._restart_later(child, error=one_line(exc))
            return
        child.process = process
        self.log.info("worker_process_started", slot=child.slot, pid=process.pid)

    def _look_after(self, child: Child) -> None:
        if child.process is None:
            due = child.restart_at is not None and time.monotonic() >= child.restart_at
            if due and not self._stopping:
                self._start(child)
            return
        returncode = child.process.poll()
        if returncode is None:
            return
        pid = child.process.pid
        child.process = None
        if self.metrics_dir is not None:
            # Its live gauges leave the sums; its counters stay counted.
            multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        if returncode == 0 or self._stopping:
            child.done = returncode == 0
            log = self.log.info if returncode == 0 else self.log.warning
            log("worker_process_exited", slot=child.slot, pid=pid, **exit_fields(returncode))
            return
        self._restart_later(child, pid=pid, **exit_fields(returncode))

    def _restart_later(self, child: Child, **why: Any) -> None:
        """One log line per crash: which child, how it ended, and when it starts again."""
        now = time.monotonic()
        if now - child.started_at >= STABLE_SECONDS:
            child.delay = FIRST_RESTART_DELAY_SECONDS
        child.restart_at = now + child.delay
        child.restarts += 1
        self.log.warning(
            "worker_process_restarting",
            slot=child.slot,
            restart_in=child.delay,
            restarts=child.restarts,
            **why,
        )
        child.delay = min(child.delay * 2, MAX_RESTART_DELAY_SECONDS)

    def _kill_hung(self) -> None:
        if self._kill_at is None or time.monotonic() < self._kill_at:
            return
        self._kill_at = None
        for child in self.children:
            if child.process is not None:
                self.log.error(
                    "worker_process_killed",
                    slot=child.slot,
                    pid=child.process.pid,
                    after_seconds=self.kill_after,
                    hint="it did not stop within its drain timeout; the leases of its jobs "
                    "lapse and a rescuer takes them back",
                )
                child.process.kill()


def supervise(
    ctx: typer.Context,
    *,
    processes: int,
    drain_timeout: float,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Run ``processes`` workers as ``ctx`` (``run``'s) asks, until stopped; their metrics
    on ``metrics_port``, if given, as one set."""
    command = [
        sys.executable,
        "-m",
        "outbox_worker",
        "run",
        *worker_args(ctx),
        "--supervisor-pid",
        str(os.getpid()),
    ]
    env = worker_environment(ctx, os.environ)
    with contextlib.ExitStack() as stack:
        metrics_dir = None
        if metrics_port is not None:
            # A directory of its own: files left by another supervisor's children would be
            # summed in.
            metrics_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="outbox-metrics-"))
            env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
            stack.callback(start_metrics_server(metrics_port, metrics_host, registry))
            structlog.get_logger("outbox_worker").info(
                "metrics_serving", host=metrics_host, port=metrics_port, path="/metrics"
            )
        Supervisor(
            command,
            env,
            processes=processes,
            kill_after=drain_timeout + KILL_AFTER_DRAIN_SECONDS,
            metrics_dir=metrics_dir,
        ).run()
