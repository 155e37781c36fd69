"""Processes, clocks and statistics: what every measurement shares.

Workers run in child processes whose output goes to a file. A child reports what it did as
JSON lines on stdout (``{"event": "ready", "t": <time.time()>}``); pgoutbox's worker is the
real ``outbox-worker`` CLI and reports through its own JSON log. Peak RSS is the kernel's
high-water mark of the child (``VmHWM`` in ``/proc/<pid>/status``), read every 10 ms while
the parent waits: it only ever grows, so the last reading before exit is the peak.
(``wait4``'s ``ru_maxrss`` would not do: it counts the parent's pages at fork.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent


def git_state(*paths: str) -> tuple[str, bool] | None:
    """The short HEAD commit and whether ``paths`` have uncommitted changes; None without git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--", *paths],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return head, bool(dirty)


class BenchError(RuntimeError):
    """A run that did not do what it must (a worker failed, jobs were left over)."""


# ---------------------------------------------------------------------------------------------
# Child side
# ---------------------------------------------------------------------------------------------


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout with the wall-clock time, for the parent to read."""
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


def run_async(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a child's main on uvloop when installed (every system gets the same loop)."""
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


class Stamps:
    """Handler-side record of when each latency job started: ``<i> <time.time()>`` lines."""

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._file: TextIO | None = None

    def record(self, i: int) -> None:
        now = time.time()
        if self._file is None:
            if not self._path:
                return
            self._file = open(self._path, "a", buffering=1)  # noqa: SIM115  (kept open)
        self._file.write(f"{i} {now}\n")


def read_stamps(path: Path) -> dict[int, float]:
    stamps: dict[int, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                stamps[int(parts[0])] = float(parts[1])
    return stamps


# ---------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("DATABASE_URL", None)
    return {**env, **(extra or {})}


@dataclass
class Child:
    """A child process whose stdout and stderr go to one file."""

    args: list[str]
    log_path: Path
    env: dict[str, str]
    spawned: float = 0.0
    returncode: int | None = None
    maxrss_kb: int = 0  # VmHWM, the peak resident set
    _popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Child:
        log = self.log_path.open("wb")
        self.spawned = time.time()
        # A session of its own, so that a kill reaches its children too (celery's pool).
        self._popen = subprocess.Popen(
            self.args,
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self._popen is not None
        return self._popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        """Every JSON object line of the output (the child's events and structlog's lines)."""
        found = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue
        return found

    def _sample_peak(self) -> None:
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        self.maxrss_kb = max(self.maxrss_kb, int(line.split()[1]))
                        return
        except (OSError, ValueError):
            return

    def _reap(self, block: bool) -> bool:
        if self.returncode is not None:
            return True
        self._sample_peak()
        pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return False
        self.returncode = os.waitstatus_to_exitcode(status)
        assert self._popen is not None
        self._popen.returncode = self.returncode
        return True

    async def wait(self, within: float) -> int:
        deadline = time.monotonic() + within
        while not self._reap(block=False):
            if time.monotonic() > deadline:
                self.kill()
                raise BenchError(
                    f"{self.args[2:5]} still running after {within:.0f}s; "
                    f"output:\n{self.output()[-3000:]}"
                )
            await asyncio.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    async def wait_ok(self, within: float) -> None:
        code = await self.wait(within)
        if code != 0:
            raise BenchError(f"{self.args[2:5]} exited {code}:\n{self.output()[-3000:]}")

    async def wait_for(self, predicate: Callable[[Child], bool], within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while not predicate(self):
            if self._reap(block=False):
                raise BenchError(
                    f"exited {self.returncode} before {what}:\n{self.output()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise BenchError(f"no {what} after {within:.0f}s:\n{self.output()[-3000:]}")
            await asyncio.sleep(0.01)

    def terminate(self) -> None:
        if self.returncode is None and self._popen is not None:
            self._popen.terminate()

    def kill(self) -> None:
        """SIGKILL to the child's whole process group, then reap it."""
        if self._popen is None or self.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._reap(block=True)


def python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (q in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class Sample:
    """The repetitions of one figure; the table shows the median and the spread."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def low(self) -> float:
        return min(self.values) if self.values else math.nan

    @property
    def high(self) -> float:
        return max(self.values) if self.values else math.nan

    def __bool__(self) -> bool:
        return bool(self.values)
